//! What went wrong with a remote lock, naming the server and what to do.

use crate::settings::Settings;
use crate::Holder;

/// An error of a remote lock. Every message names the server (never the password).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad backend URL or setting.
    #[error("{0}")]
    Settings(String),
    #[error("cannot reach PostgreSQL server {server}: {why}")]
    Unreachable { server: String, why: String },
    #[error("PostgreSQL server {server} refused user {user:?}: {why}")]
    Auth { server: String, user: String, why: String },
    #[error("PostgreSQL server {server}: user {user:?} lacks a privilege: {why}. {what}")]
    Privilege { server: String, user: String, why: String, what: String },
    /// The lock is busy (`NoWait`) or the wait ran out.
    #[error("{}", busy_message(lock, server, holder.as_deref(), *timed_out))]
    Busy { lock: String, server: String, holder: Option<Box<Holder>>, timed_out: bool },
    /// The lock was lost while held: the connection to the server broke (partition, server
    /// restart), so the server has released it or will within the remote timeout.
    #[error(
        "lock {lock} on {server} was lost while held: {why}; another host may take it now (the server releases a \
         lost session's locks within the remote timeout)"
    )]
    Lost { lock: String, server: String, why: String },
    #[error("PostgreSQL server {server}: {why}")]
    Server { server: String, why: String },
}

fn busy_message(lock: &str, server: &str, holder: Option<&Holder>, timed_out: bool) -> String {
    let what = if timed_out { "timed out waiting for" } else { "busy:" };
    match holder {
        Some(h) => format!("{what} lock {lock} on {server}, held by {}", h.describe()),
        None => format!("{what} lock {lock} on {server}, held by another session"),
    }
}

impl Error {
    /// A busy lock or a wait that ran out.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Busy { .. })
    }

    /// An error of connecting (startup, authentication) turned into what a user can act on.
    pub(crate) fn from_connect(s: &Settings, e: tokio_postgres::Error) -> Error {
        use tokio_postgres::error::SqlState;
        let server = s.server();
        let user = s.user.clone();
        match e.code() {
            Some(c) if *c == SqlState::INVALID_PASSWORD => Error::Auth {
                server,
                user,
                why: format!(
                    "{}; check the password in the URL, PGPASSFILE or ~/.pgpass (a .pgpass readable by others is \
                     ignored)",
                    describe(&e)
                ),
            },
            Some(c) if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => Error::Auth {
                server,
                user,
                why: format!("{}; ask the server's administrator for an entry in pg_hba.conf", describe(&e)),
            },
            Some(c) if *c == SqlState::INVALID_CATALOG_NAME => Error::Server {
                server,
                why: format!("{}; create it (`createdb {}`) or name another in the URL", describe(&e), s.dbname),
            },
            Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => Error::Server {
                server,
                why: format!("{}; every held or waited-for remote lock takes one connection", describe(&e)),
            },
            _ => {
                let why = describe(&e);
                if why.contains("password") {
                    Error::Auth {
                        server,
                        user,
                        why: format!("{why}; put the password in the URL, PGPASSFILE or ~/.pgpass (mode 0600)"),
                    }
                } else if why.contains("certificate") || why.contains("tls") || why.contains("TLS") {
                    Error::Unreachable {
                        server,
                        why: format!("{why}; check sslmode and sslrootcert (the certificate authority to trust)"),
                    }
                } else {
                    Error::Unreachable { server, why }
                }
            }
        }
    }

    /// An error of a statement in a session.
    pub(crate) fn from_query(s: &Settings, doing: &str, e: tokio_postgres::Error) -> Error {
        use tokio_postgres::error::SqlState;
        let server = s.server();
        match e.code() {
            Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => Error::Privilege {
                server,
                user: s.user.clone(),
                why: describe(&e),
                what: format!(
                    "While {doing}. The first use creates tables buildlock_schema, buildlock_locks and \
                     buildlock_holders (needs CREATE on the database's default schema, or have an owner run it once); \
                     afterwards every user needs SELECT, INSERT, UPDATE and DELETE on them (docs/REMOTE.md)"
                ),
            },
            _ if e.is_closed() || e.code().is_some_and(|c| c.code().starts_with("57P")) => Error::Lost {
                lock: String::new(),
                server,
                why: format!("the connection ended while {doing}: {}", describe(&e)),
            },
            _ => Error::Server { server, why: format!("while {doing}: {}", describe(&e)) },
        }
    }
}

/// One line for a `tokio_postgres::Error`, with the server's message and code or the cause.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
