//! Connection settings from a libpq URL (`postgres://user:password@host:port/db?sslmode=...`)
//! and the password file (`PGPASSFILE`, `~/.pgpass`), the way libpq reads them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;

/// The default `--remote-timeout`: how long a dead or cut-off host may keep its locks.
pub const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest `--remote-timeout` accepted: below it, a loaded machine's scheduling delays
/// would be taken for a lost server.
pub const MIN_REMOTE_TIMEOUT: Duration = Duration::from_secs(8);
/// `connect_timeout` when the URL sets none (libpq waits forever; we never hang).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it (libpq's default); the certificate is checked only against
    /// an `sslrootcert` if one is given.
    Prefer,
    /// TLS or nothing; the certificate is checked only against an `sslrootcert` if one is given.
    Require,
    /// TLS, and the certificate must chain to `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A Unix socket directory (`host=/run/postgresql`): the socket is `DIR/.s.PGSQL.PORT`.
    Unix(PathBuf),
}

/// Everything needed to reach a server, from a URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// How long a dead or cut-off host may keep its locks (see `docs/REMOTE.md`).
    pub remote_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(f, "Settings({})", self.display())
    }
}

impl Settings {
    /// Parses a `postgres://` or `postgresql://` URL. Known parameters: `host`, `port`,
    /// `user`, `password`, `dbname`, `sslmode`, `sslrootcert`, `connect_timeout`,
    /// `application_name`; others are an error (a misspelled `sslmode` must not silently mean
    /// no TLS). Without a password in the URL, `PGPASSFILE` or `~/.pgpass` is read.
    pub fn from_url(url: &str) -> Result<Settings, Error> {
        let bad = |why: String| Error::Settings(format!("backend URL {}: {why}", redact(url)));
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| bad("only postgres:// (or postgresql://) URLs are supported".into()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (mut user, mut password) = (None, None);
        if let Some(u) = userinfo {
            match u.split_once(':') {
                Some((n, p)) => {
                    user = Some(decode(n).map_err(&bad)?);
                    password = Some(decode(p).map_err(&bad)?);
                }
                None => user = Some(decode(u).map_err(&bad)?),
            }
        }
        let (mut host, mut port) = (None, None);
        if !hostport.is_empty() {
            let (h, p) = if let Some(v6) = hostport.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in the host".into()))?;
                (h.to_owned(), after.strip_prefix(':'))
            } else if hostport.contains(',') {
                return Err(bad("several hosts are not supported; give one".into()));
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h.to_owned(), Some(p)),
                    None => (hostport.to_owned(), None),
                }
            };
            if !h.is_empty() {
                host = Some(decode(&h).map_err(&bad)?);
            }
            if let Some(p) = p.filter(|p| !p.is_empty()) {
                port = Some(p.parse::<u16>().map_err(|_| bad(format!("port {p:?} is not a port number")))?);
            }
        }
        let mut dbname = if path.is_empty() { None } else { Some(decode(path).map_err(&bad)?) };
        let (mut sslmode, mut sslrootcert, mut connect_timeout, mut application_name) =
            (SslMode::Prefer, None, DEFAULT_CONNECT_TIMEOUT, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v).map_err(&bad)?;
            match k {
                "host" => host = Some(v),
                "port" => port = Some(v.parse().map_err(|_| bad(format!("port {v:?} is not a port number")))?),
                "user" => user = Some(v),
                "password" => password = Some(v),
                "dbname" => dbname = Some(v),
                "application_name" => application_name = Some(v),
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v)),
                "sslmode" => {
                    sslmode = match v.as_str() {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        _ => {
                            return Err(bad(format!(
                                "sslmode={v} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                            )))
                        }
                    }
                }
                "connect_timeout" => {
                    let secs: u64 = v.parse().map_err(|_| bad(format!("connect_timeout={v} is not whole seconds")))?;
                    // libpq: 0 means wait forever, and anything below 2 s is taken as 2 s. We
                    // never wait forever: 0 keeps our default.
                    if secs > 0 {
                        connect_timeout = Duration::from_secs(secs.max(2));
                    }
                }
                other => return Err(bad(format!("unknown parameter {other:?}"))),
            }
        }
        let user = match user {
            Some(u) => u,
            None => std::env::var("PGUSER").ok().filter(|u| !u.is_empty()).unwrap_or_else(current_user),
        };
        let host = match host {
            Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            Some(h) => Host::Tcp(h),
            None => Host::Tcp("localhost".into()),
        };
        if matches!(host, Host::Unix(_))
            && matches!(sslmode, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
        {
            return Err(bad("TLS is not used over a Unix socket: drop sslmode or connect over TCP".into()));
        }
        if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && sslrootcert.is_none() {
            return Err(bad(format!(
                "sslmode={} needs sslrootcert=FILE (the certificate authority to trust)",
                if sslmode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" }
            )));
        }
        let port = port.unwrap_or(5432);
        let dbname = dbname.unwrap_or_else(|| user.clone());
        let mut settings = Settings {
            host,
            port,
            user,
            password,
            dbname,
            application_name: application_name.unwrap_or_else(|| "buildlock".into()),
            sslmode,
            sslrootcert,
            connect_timeout,
            remote_timeout: DEFAULT_REMOTE_TIMEOUT,
        };
        if settings.password.is_none() {
            settings.password = pgpass_password(&settings);
        }
        Ok(settings)
    }

    /// How users see the server: `postgres://host:port/db`, never the user's password.
    pub fn display(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("postgres://[{h}]:{}/{}", self.port, self.dbname),
            Host::Tcp(h) => format!("postgres://{h}:{}/{}", self.port, self.dbname),
            Host::Unix(d) => format!("postgres:///{}?host={}&port={}", self.dbname, d.display(), self.port),
        }
    }

    /// These settings as one URL that [`Settings::from_url`] reads back to the same settings
    /// (the password included, as found in the URL or `.pgpass`; a relative `sslrootcert` made
    /// absolute), for a process of the same user that connects on this one's behalf (the
    /// daemon). The remote timeout is not part of it. Never print it: [`redact`] it.
    pub fn to_url(&self) -> String {
        let host = match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(d) => d.display().to_string(),
        };
        let sslmode = match self.sslmode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        };
        let mut params = vec![
            ("host", host),
            ("port", self.port.to_string()),
            ("user", self.user.clone()),
            ("dbname", self.dbname.clone()),
            ("application_name", self.application_name.clone()),
            ("sslmode", sslmode.to_owned()),
            ("connect_timeout", self.connect_timeout.as_secs().max(2).to_string()),
        ];
        if let Some(p) = &self.sslrootcert {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            params.push(("sslrootcert", p.display().to_string()));
        }
        if let Some(p) = &self.password {
            params.push(("password", p.clone()));
        }
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        format!("postgres://?{}", query.join("&"))
    }

    /// `host:port`, or the socket's path, for messages.
    pub fn server(&self) -> String {
        match &self.host {
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(d) => d.join(format!(".s.PGSQL.{}", self.port)).display().to_string(),
        }
    }

    /// With another `--remote-timeout` (at least [`MIN_REMOTE_TIMEOUT`]).
    pub fn with_remote_timeout(mut self, t: Duration) -> Result<Settings, Error> {
        if t < MIN_REMOTE_TIMEOUT {
            return Err(Error::Settings(format!(
                "--remote-timeout {}s is too short: give at least {}s",
                t.as_secs_f64(),
                MIN_REMOTE_TIMEOUT.as_secs()
            )));
        }
        self.remote_timeout = t;
        Ok(self)
    }

    /// The heartbeat period (and each heartbeat's deadline): a quarter of the remote timeout,
    /// so a lost connection is noticed within half of it (see [`crate::Bounds`]).
    pub fn heartbeat(&self) -> Duration {
        self.remote_timeout / 4
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for [`Settings::to_url`].
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((u, _)) => format!("{u}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = tail
        .split('&')
        .map(|p| if p.starts_with("password=") || p.contains("?password=") { redact_param(p) } else { p.to_owned() })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}://{authority}{tail}")
}

fn redact_param(p: &str) -> String {
    match p.find("password=") {
        Some(i) => format!("{}password=***", &p[..i]),
        None => p.to_owned(),
    }
}

/// Percent-decoding, as URLs need.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad percent-escape %{hex} in {s:?}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

fn current_user() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "postgres".into())
}

/// The password for `s` from `PGPASSFILE` or `~/.pgpass`, if any.
fn pgpass_password(s: &Settings) -> Option<String> {
    let path = match std::env::var_os("PGPASSFILE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".pgpass"),
    };
    let text = read_pgpass(&path)?;
    let host = match &s.host {
        Host::Tcp(h) => h.clone(),
        // libpq matches a Unix socket against `localhost` (and the socket directory).
        Host::Unix(_) => "localhost".into(),
    };
    pgpass_lookup(&text, &host, s.port, &s.dbname, &s.user)
}

/// The file's text, if it is a regular file that only its owner may read or write (libpq
/// ignores it otherwise, with a warning).
fn read_pgpass(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!("password file {} is not a plain file; ignoring it", path.display());
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "password file {} has group or world access; ignoring it (run `chmod 0600 {}`)",
                path.display(),
                path.display()
            );
            return None;
        }
    }
    std::fs::read_to_string(path).ok()
}

/// The first line of a `.pgpass` text that matches: `hostname:port:database:username:password`,
/// `*` matching anything, `\:` and `\\` escaping, `#` lines ignored.
pub fn pgpass_lookup(text: &str, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = |field: &str, want: &str| field == "*" || field == want;
        if matches(&fields[0], host)
            && matches(&fields[1], &port)
            && matches(&fields[2], dbname)
            && matches(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

/// Splits on unescaped `:` into at most five fields (the password may contain `:`).
fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("one field").push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_url_reads_back_to_the_same_settings() {
        for url in [
            "postgres://ci:s%3Ac%26r%20et@db.internal:6543/locks?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=5&application_name=a%20b",
            "postgres://u:p@[::1]:5433/d?sslmode=disable",
            "postgres://u:p@/d?host=/run/postgresql&port=5444",
        ] {
            let s = Settings::from_url(url).unwrap();
            let again = Settings::from_url(&s.to_url()).unwrap();
            assert_eq!(again, s, "{url} -> {}", redact(&s.to_url()));
        }
        let s = Settings::from_url("postgres://u:secret@h/d").unwrap();
        assert!(!redact(&s.to_url()).contains("secret"));
    }

    #[test]
    fn url_with_everything() {
        let s = Settings::from_url(
            "postgres://ci:s%3Acret@db.internal:6543/locks?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=5&application_name=x",
        )
        .unwrap();
        assert_eq!(s.host, Host::Tcp("db.internal".into()));
        assert_eq!((s.port, s.user.as_str(), s.password.as_deref()), (6543, "ci", Some("s:cret")));
        assert_eq!((s.dbname.as_str(), s.application_name.as_str()), ("locks", "x"));
        assert_eq!(s.sslmode, SslMode::VerifyFull);
        assert_eq!(s.sslrootcert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert_eq!(s.display(), "postgres://db.internal:6543/locks");
        assert!(!format!("{s:?}").contains("s:cret"));
    }

    #[test]
    fn a_holder_sees_a_loss_and_stops_its_command_before_the_server_frees_the_lock() {
        for secs in [8, 30, 300] {
            let s =
                Settings::from_url("postgres://h/db").unwrap().with_remote_timeout(Duration::from_secs(secs)).unwrap();
            let bounds = crate::Bounds { remote_timeout: s.remote_timeout };
            // Loss seen within two heartbeats; one second for run's check; then the grace.
            let stopped_by = s.heartbeat() * 2 + Duration::from_secs(1) + bounds.stop_grace();
            assert!(stopped_by < s.remote_timeout, "{secs}s: {stopped_by:?}");
        }
        let e = Settings::from_url("postgres://h/db").unwrap().with_remote_timeout(Duration::from_secs(3)).unwrap_err();
        assert!(e.to_string().contains("at least 8s"), "{e}");
    }

    #[test]
    fn unix_socket_host_and_defaults() {
        let s = Settings::from_url("postgresql:///buildlock?host=/tmp/pg%20dir&port=5555&user=me").unwrap();
        assert_eq!(s.host, Host::Unix(PathBuf::from("/tmp/pg dir")));
        assert_eq!((s.port, s.dbname.as_str(), s.sslmode), (5555, "buildlock", SslMode::Prefer));
        assert_eq!(s.server(), "/tmp/pg dir/.s.PGSQL.5555");
        assert_eq!(s.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        for (url, says) in [
            ("mysql://x/y", "only postgres://"),
            ("postgres://h/db?sslmode=verify", "sslmode=verify is not one of"),
            ("postgres://h/db?sslmod=require", "unknown parameter \"sslmod\""),
            ("postgres://h:99999/db", "not a port number"),
            ("postgres://h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://u:hunter2@h/db?sslmode=bad", "u:***@h"),
        ] {
            let e = Settings::from_url(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn redact_hides_passwords_everywhere() {
        assert_eq!(redact("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://h/db?password=p&sslmode=require"),
            "postgres://h/db?password=***&sslmode=require"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn pgpass_first_matching_line_wins_with_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:ci:nope\ndb.internal:5432:locks:ci:pa\\:ss:word\n*:*:*:ci:fallback\n";
        assert_eq!(pgpass_lookup(text, "db.internal", 5432, "locks", "ci").as_deref(), Some("pa:ss:word"));
        assert_eq!(pgpass_lookup(text, "db.internal", 6543, "locks", "ci").as_deref(), Some("fallback"));
        assert_eq!(pgpass_lookup(text, "db.internal", 5432, "locks", "someone"), None);
        assert_eq!(pgpass_lookup("h:5432:db:u\n", "h", 5432, "db", "u"), None, "a line without a password field");
    }

    #[cfg(unix)]
    #[test]
    fn pgpass_file_with_group_access_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read_pgpass(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_pgpass(&path).as_deref(), Some("*:*:*:*:secret\n"));
        assert_eq!(read_pgpass(dir.path()), None, "a directory");
    }
}
