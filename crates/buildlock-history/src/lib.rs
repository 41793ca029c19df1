//! `buildlock-history`: records lock events and answers questions about them.
//!
//! Every event of a lock's life (requested, granted, released, timed out, refused as busy,
//! lost, a stale lock recovered, broken by `break`) is an [`Event`], kept in an embedded SQLite
//! database ([`Store`]) in the user's data directory (`~/.local/share/buildlock/history.sqlite3`
//! on Linux). [`Setting::from_env`] reads `BUILDLOCK_HISTORY` (`0`: off; a path: use that file).
//! [`stats`] turns the events of a lock into figures (waits, holds, timeouts, stale recoveries)
//! and [`timeline`] into the bars of a chart; [`svg`] draws them, [`prometheus`] exports them.
//!
//! Two ways to write, neither of which may delay or break locking:
//! - [`Background`]: a thread fed by a channel that writes in batches (the daemon). Sending
//!   never blocks: when the channel is full, the event is dropped.
//! - [`record_direct`]: the caller writes after it has released the lock (the library and CLI
//!   in direct mode). It only appends its rows to a spool file beside the database
//!   (`history.sqlite3-spool`, one JSON line per event): three system calls, where opening
//!   SQLite in every short-lived process would cost more than the lock. The spool is moved into
//!   the database by the next reader (`stats`, `history`, a waiter's "usually" figure), by the
//!   daemon's writer, or by a direct writer once it has grown past [`SPOOL_IMPORT_BYTES`]. A busy
//!   database then drops the rows (debug log) rather than wait.
//!
//! A database that cannot be opened or written (corrupt, read-only) is one warning per process;
//! every later event is dropped.
//!
//! ```no_run
//! use buildlock_history::{Event, Kind, Setting, Store};
//! let Setting::At(path) = Setting::from_env() else { return Ok(()) };
//! let store = Store::open(&path)?;
//! let mut e = Event::new("/home/me/.local/share/buildlock/locks/build.lock", Kind::Granted);
//! e.wait_us = Some(1_500);
//! store.insert(&[e])?;
//! let events = store.events(Some("/home/me/.local/share/buildlock/locks/build.lock"), 0)?;
//! println!("{:?}", buildlock_history::stats(&events, 5));
//! # Ok::<(), buildlock_history::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags};
use serde::{Deserialize, Serialize};

mod render;
mod report;

pub use render::{human_ms, layout, svg, timeline, Bar, BarKind, Mark, Row, Timeline};
pub use report::{prometheus, stats, usual_hold, LockStats, Percentiles, TopHolder, USUAL_MIN_HOLDS};

/// The schema version this crate writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// Events older than this are pruned by default (`BUILDLOCK_HISTORY_DAYS`).
pub const DEFAULT_RETENTION_DAYS: u64 = 30;
/// At most this many events are kept by default (`BUILDLOCK_HISTORY_MAX_ROWS`).
pub const DEFAULT_MAX_ROWS: u64 = 1_000_000;
/// How long a direct-mode writer waits for another writer before dropping its rows.
pub const DIRECT_BUSY_TIMEOUT: Duration = Duration::from_millis(20);
/// How long the daemon's writer thread waits for another writer.
pub const BACKGROUND_BUSY_TIMEOUT: Duration = Duration::from_millis(200);
/// A wait at least this long counts as "had to wait" in [`stats`].
pub const WAITED_AT_LEAST_US: u64 = 10_000;

/// What happened to a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Asked for and not granted at once (queued, or refused after a wait): a request granted
    /// at once is told by its grant alone, whose `wait_us` says when it was asked for.
    Requested,
    /// Granted; `wait_us` says after how long.
    Granted,
    /// Released; `hold_us` says after how long.
    Released,
    TimedOut,
    /// Refused at once (`-n`): the lock was busy.
    Busy,
    /// Lost while held (the lock file deleted or replaced, a bound lease lost).
    Lost,
    /// A stale lock was recovered; `rule` says why it was stale.
    StaleRecovered,
    /// Broken by `buildlock-client break`.
    Broken,
    /// Refused at once: waiting would have closed a cycle of waits (`detail` names it).
    Deadlock,
    /// The holder was stopped (SIGTERM, then SIGKILL) for holding past its max-hold; its
    /// release follows once it is gone.
    StoppedMaxHold,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Requested,
        Kind::Granted,
        Kind::Released,
        Kind::TimedOut,
        Kind::Busy,
        Kind::Lost,
        Kind::StaleRecovered,
        Kind::Broken,
        Kind::Deadlock,
        Kind::StoppedMaxHold,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requested => "requested",
            Kind::Granted => "granted",
            Kind::Released => "released",
            Kind::TimedOut => "timed_out",
            Kind::Busy => "busy",
            Kind::Lost => "lost",
            Kind::StaleRecovered => "stale_recovered",
            Kind::Broken => "broken",
            Kind::Deadlock => "deadlock",
            Kind::StoppedMaxHold => "stopped_max_hold",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Why a stale lock was judged stale (the rules of the seed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StaleRule {
    /// Its metadata names a process on this host that is dead.
    DeadPid,
    /// No metadata, and the lock file is older than the grace period.
    NoMetadataOld,
    /// Its holder could not be checked (another host, no permission) and stopped refreshing
    /// the lock's heartbeat.
    StoppedHeartbeat,
}

impl StaleRule {
    pub const ALL: [StaleRule; 3] = [StaleRule::DeadPid, StaleRule::NoMetadataOld, StaleRule::StoppedHeartbeat];

    pub fn as_str(self) -> &'static str {
        match self {
            StaleRule::DeadPid => "dead_pid",
            StaleRule::NoMetadataOld => "no_metadata_old",
            StaleRule::StoppedHeartbeat => "stopped_heartbeat",
        }
    }

    fn parse(s: &str) -> Option<StaleRule> {
        StaleRule::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One lock event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The lock file's absolute path.
    pub lock: String,
    pub kind: Kind,
    /// `shared` or `exclusive` (empty if unknown).
    pub mode: String,
    /// Where the lock lives: `local` (a lock file on this machine).
    pub backend: String,
    /// Ties a request to its grant and release (one acquisition).
    pub session: String,
    pub pid: Option<u32>,
    pub command: String,
    pub operation: String,
    pub host: String,
    pub wait_us: Option<u64>,
    pub hold_us: Option<u64>,
    pub rule: Option<StaleRule>,
    /// Anything else worth keeping (the reason a lock was lost or broken).
    pub detail: String,
}

impl Event {
    /// An event of `kind` on `lock`, now, on this host's `local` backend; the rest empty.
    pub fn new(lock: impl Into<String>, kind: Kind) -> Event {
        Event {
            at_ms: now_ms(),
            lock: lock.into(),
            kind,
            mode: String::new(),
            backend: "local".into(),
            session: String::new(),
            pid: None,
            command: String::new(),
            operation: String::new(),
            host: String::new(),
            wait_us: None,
            hold_us: None,
            rule: None,
            detail: String::new(),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A duration in microseconds, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What went wrong with the history database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lock history {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("lock history {path} has schema version {found}, newer than this buildlock knows ({SCHEMA_VERSION}); upgrade buildlock, or move the file aside")]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("lock history {path}: cannot create its directory: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("lock history is off (BUILDLOCK_HISTORY=0)")]
    Off,
    #[error("lock history spool {path}: {source}")]
    Spool { path: PathBuf, source: std::io::Error },
}

/// Where history goes: `BUILDLOCK_HISTORY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    Off,
    At(PathBuf),
}

impl Setting {
    /// `BUILDLOCK_HISTORY=0` (or `off`, `false`, `no`): off; unset, empty, `1`, `on`, `true` or
    /// `yes`: `history.sqlite3` in the user's data directory (`~/.local/share/buildlock` on
    /// Linux), off when there is no home directory to put it in; any other value: that file, a
    /// relative path taken in the user's data directory, not in each process's working
    /// directory (the processes of one build, and the daemon, run in different ones).
    pub fn from_env() -> Setting {
        Setting::parse(std::env::var_os("BUILDLOCK_HISTORY"))
    }

    /// [`Setting::from_env`] for the value `v` of `BUILDLOCK_HISTORY`.
    pub fn parse(v: Option<std::ffi::OsString>) -> Setting {
        let word = v.as_ref().and_then(|v| v.to_str()).map(str::to_ascii_lowercase);
        let data_dir = || directories::ProjectDirs::from("", "", "buildlock").map(|d| d.data_dir().to_path_buf());
        match (v, word.as_deref()) {
            (_, Some("0" | "off" | "false" | "no")) => Setting::Off,
            // A switch, not a file name: "1" would otherwise make a database named 1 wherever
            // each process happens to run.
            (Some(v), word) if !v.is_empty() && !matches!(word, Some("1" | "on" | "true" | "yes")) => {
                let path = PathBuf::from(v);
                match data_dir() {
                    Some(dir) if path.is_relative() => Setting::At(dir.join(path)),
                    _ => Setting::At(path),
                }
            }
            _ => match data_dir() {
                Some(dir) => Setting::At(dir.join("history.sqlite3")),
                None => Setting::Off,
            },
        }
    }
}

/// How much history is kept: `BUILDLOCK_HISTORY_DAYS` and `BUILDLOCK_HISTORY_MAX_ROWS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub days: u64,
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention { days: DEFAULT_RETENTION_DAYS, max_rows: DEFAULT_MAX_ROWS }
    }
}

impl Retention {
    /// The defaults, overridden by `BUILDLOCK_HISTORY_DAYS` and `BUILDLOCK_HISTORY_MAX_ROWS`
    /// (a value that is not a number is ignored with a warning).
    pub fn from_env() -> Retention {
        let mut r = Retention::default();
        for (var, slot) in [("BUILDLOCK_HISTORY_DAYS", &mut r.days), ("BUILDLOCK_HISTORY_MAX_ROWS", &mut r.max_rows)] {
            if let Ok(v) = std::env::var(var) {
                match v.trim().parse() {
                    Ok(n) => *slot = n,
                    Err(_) => tracing::warn!("{var}={v:?} is not a whole number; using {}", *slot),
                }
            }
        }
        r
    }
}

/// The history database, open.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    lock TEXT NOT NULL,
    kind TEXT NOT NULL,
    mode TEXT NOT NULL,
    backend TEXT NOT NULL,
    session TEXT NOT NULL,
    pid INTEGER,
    command TEXT NOT NULL,
    operation TEXT NOT NULL,
    host TEXT NOT NULL,
    wait_us INTEGER,
    hold_us INTEGER,
    rule TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_lock_at ON events (lock, at_ms);
CREATE INDEX IF NOT EXISTS events_at ON events (at_ms);
";

/// The write-ahead log is checkpointed (and truncated) past this many pages.
const WAL_PAGES: i64 = 256;

/// Insert this many rows, then prune (and once at every open of a long-lived writer).
const PRUNE_EVERY: i64 = 1024;

impl Store {
    /// Opens (creating it and its directory if need be) the database at `path`, with the
    /// daemon's busy timeout.
    pub fn open(path: &Path) -> Result<Store, Error> {
        Store::open_with(path, BACKGROUND_BUSY_TIMEOUT)
    }

    /// Opens the database at `path`, waiting at most `busy` for another writer.
    pub fn open_with(path: &Path, busy: Duration) -> Result<Store, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Dir { path: path.to_owned(), source })?;
        }
        let sql = |source| Error::Sqlite { path: path.to_owned(), source };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        conn.busy_timeout(busy).map_err(sql)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql)?;
        if version > SCHEMA_VERSION {
            return Err(Error::NewerSchema { path: path.to_owned(), found: version });
        }
        // WAL: the daemon and direct-mode processes write at once, readers never block them.
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0)).map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::debug!("lock history {}: journal mode {mode}, not wal", path.display());
        }
        conn.pragma_update(None, "synchronous", "normal").map_err(sql)?;
        // A short write-ahead log: a process that opens the database when no other has it open
        // reads all of it to rebuild its index.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_PAGES).map_err(sql)?;
        conn.pragma_update(None, "journal_size_limit", WAL_PAGES * 4096).map_err(sql)?;
        if version < SCHEMA_VERSION {
            conn.execute_batch(SCHEMA).map_err(sql)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sql)?;
        }
        Ok(Store { conn, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inserts `events` in one transaction; prunes now and then (not per write).
    pub fn insert(&self, events: &[Event]) -> Result<(), Error> {
        self.insert_with(events, Retention::default())
    }

    /// [`Store::insert`] with the given retention for pruning.
    pub fn insert_with(&self, events: &[Event], keep: Retention) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        let sql = |source| Error::Sqlite { path: self.path.clone(), source };
        let tx = self.conn.unchecked_transaction().map_err(sql)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO events (at_ms, lock, kind, mode, backend, session, pid, command, operation, host, \
                     wait_us, hold_us, rule, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .map_err(sql)?;
            for e in events {
                stmt.execute(params![
                    e.at_ms,
                    e.lock,
                    e.kind.as_str(),
                    e.mode,
                    e.backend,
                    e.session,
                    e.pid,
                    e.command,
                    e.operation,
                    e.host,
                    e.wait_us.map(clamp),
                    e.hold_us.map(clamp),
                    e.rule.map(StaleRule::as_str),
                    e.detail,
                ])
                .map_err(sql)?;
            }
        }
        // Row ids are given in order: the ones just written end at `after`.
        let after = tx.last_insert_rowid();
        let before = after - events.len() as i64;
        // Crossed a multiple of PRUNE_EVERY: prune. Row ids only grow, so every writer prunes
        // about once per PRUNE_EVERY rows, whichever it is.
        if before / PRUNE_EVERY != after / PRUNE_EVERY {
            prune_in(&tx, keep, now_ms()).map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Moves the rows of the spool (direct-mode writers') into the database: claims the spool
    /// by renaming it, inserts its lines (skipping any that do not parse), removes it. A writer
    /// that opened the spool just before the rename and writes just after the rows were read
    /// loses its rows (a window of microseconds; history is advisory). Returns how many rows.
    pub fn import_spool(&self, keep: Retention) -> Result<usize, Error> {
        let spool = spool_path(&self.path);
        let mut claimed = spool.clone().into_os_string();
        claimed.push(format!(".{}.{}", std::process::id(), now_ms()));
        let claimed = PathBuf::from(claimed);
        let io = |source: std::io::Error| Error::Spool { path: spool.clone(), source };
        match std::fs::rename(&spool, &claimed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        }
        // A writer that opened the spool just before the rename appends to the claimed file: give
        // such a write (an open, one write, a close: microseconds) a moment to land before
        // reading, and read again below if the file grew meanwhile.
        std::thread::sleep(Duration::from_millis(10));
        let mut text = std::fs::read(&claimed).map_err(io)?;
        let events: Vec<Event> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        let mut events = events;
        if let Ok(meta) = std::fs::metadata(&claimed) {
            if meta.len() > text.len() as u64 {
                let all = std::fs::read(&claimed).map_err(io)?;
                let late = &all[text.len().min(all.len())..];
                events.extend(
                    late.split(|&b| b == b'\n')
                        .filter(|l| !l.is_empty())
                        .filter_map(|l| serde_json::from_slice(l).ok()),
                );
                text = all;
            }
        }
        let result = self.insert_with(&events, keep);
        if result.is_ok() {
            let _ = std::fs::remove_file(&claimed);
        } else {
            // Put the rows back for the next import (appending: the spool may have new ones).
            let back = std::fs::OpenOptions::new().append(true).create(true).open(&spool);
            if let Ok(mut f) = back {
                use std::io::Write as _;
                if f.write_all(&text).is_ok() {
                    let _ = std::fs::remove_file(&claimed);
                }
            }
        }
        result.map(|()| events.len())
    }

    /// Deletes events older than `keep.days` and all but the newest `keep.max_rows`.
    pub fn prune(&self, keep: Retention, now_ms: i64) -> Result<(), Error> {
        prune_in(&self.conn, keep, now_ms).map_err(|source| Error::Sqlite { path: self.path.clone(), source })
    }

    /// Whether the schema exists (a writer that just created the file may not have made it yet).
    fn has_schema(&self) -> Result<bool, Error> {
        self.conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n > 0)
            .map_err(|source| Error::Sqlite { path: self.path.clone(), source })
    }

    /// The events of `lock` (every lock if `None`) at or after `since_ms`, oldest first.
    pub fn events(&self, lock: Option<&str>, since_ms: i64) -> Result<Vec<Event>, Error> {
        let sql = |source| Error::Sqlite { path: self.path.clone(), source };
        if !self.has_schema()? {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT at_ms, lock, kind, mode, backend, session, pid, command, operation, host, wait_us, hold_us, \
                 rule, detail FROM events WHERE at_ms >= ?1 AND (?2 IS NULL OR lock = ?2) ORDER BY at_ms, id",
            )
            .map_err(sql)?;
        let rows = stmt
            .query_map(params![since_ms, lock], |r| {
                let kind: String = r.get(2)?;
                let rule: Option<String> = r.get(12)?;
                Ok((
                    kind,
                    rule,
                    Event {
                        at_ms: r.get(0)?,
                        lock: r.get(1)?,
                        kind: Kind::Requested,
                        mode: r.get(3)?,
                        backend: r.get(4)?,
                        session: r.get(5)?,
                        pid: r.get(6)?,
                        command: r.get(7)?,
                        operation: r.get(8)?,
                        host: r.get(9)?,
                        wait_us: r.get::<_, Option<i64>>(10)?.map(|v| v.max(0) as u64),
                        hold_us: r.get::<_, Option<i64>>(11)?.map(|v| v.max(0) as u64),
                        rule: None,
                        detail: r.get(13)?,
                    },
                ))
            })
            .map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, rule, mut e) = row.map_err(sql)?;
            // A kind from a newer writer (same schema, an enum grown) is skipped, not an error.
            let Some(kind) = Kind::parse(&kind) else { continue };
            e.kind = kind;
            e.rule = rule.as_deref().and_then(StaleRule::parse);
            out.push(e);
        }
        Ok(out)
    }

    /// The hold times (µs) of `lock` by `command`, newest first, at most `limit`.
    pub fn holds_by(&self, lock: &str, command: &str, limit: usize) -> Result<Vec<u64>, Error> {
        let sql = |source| Error::Sqlite { path: self.path.clone(), source };
        if !self.has_schema()? {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT hold_us FROM events WHERE lock = ?1 AND command = ?2 AND kind = 'released' \
                 AND hold_us IS NOT NULL ORDER BY at_ms DESC LIMIT ?3",
            )
            .map_err(sql)?;
        let rows = stmt
            .query_map(params![lock, command, limit as i64], |r| r.get::<_, i64>(0))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(rows.into_iter().map(|v| v.max(0) as u64).collect())
    }

    /// How many events the database holds.
    pub fn count(&self) -> Result<u64, Error> {
        self.conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|source| Error::Sqlite { path: self.path.clone(), source })
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn prune_in(conn: &Connection, keep: Retention, now_ms: i64) -> rusqlite::Result<()> {
    let horizon = now_ms.saturating_sub(i64::try_from(keep.days.saturating_mul(86_400_000)).unwrap_or(i64::MAX));
    conn.execute("DELETE FROM events WHERE at_ms < ?1", params![horizon])?;
    // Row ids only grow and rows go from the low end, so the newest `max_rows` are those above
    // max(id) - max_rows: found through the primary key, never by walking the rows (an OFFSET
    // would read up to `max_rows` of them at every prune).
    conn.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?1", params![clamp(keep.max_rows)])?;
    Ok(())
}

/// Set once a warning about an unusable database was printed in this process.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Warns once per process that history cannot be written; later failures are debug lines.
fn warn_once(e: &Error) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{e}; locking goes on without history (move the file aside to start a new one, or set BUILDLOCK_HISTORY=0)"
        );
    } else {
        tracing::debug!("{e}");
    }
}

/// Whether a failure is another writer holding the database (drop the rows quietly).
fn is_busy(e: &Error) -> bool {
    matches!(e, Error::Sqlite { source: rusqlite::Error::SqliteFailure(f, _), .. }
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// Events not yet appended to the spool: those seen while a lock was being taken (stale
/// recoveries reported by the on-disk engine), and recorded ones held back so that a process
/// taking many locks appends them a batch at a time ([`BATCH_EVENTS`], [`BATCH_AGE`]), and the
/// rest when it exits.
static PENDING: Mutex<Held> = Mutex::new(Held { pid: 0, since: None, events: Vec::new() });

struct Held {
    /// The process the events are of: a forked child starts with none (its parent writes them).
    pid: u32,
    /// When the oldest of `events` was held back.
    since: Option<std::time::Instant>,
    events: Vec<Event>,
}

impl Held {
    fn of_this_process(&mut self) -> &mut Held {
        let me = buildlock_sys::current_pid();
        if self.pid != me {
            if self.pid != 0 {
                self.events.clear();
                self.since = None;
            }
            self.pid = me;
        }
        self
    }
}

/// A process appends its events once this many are held back, ...
pub const BATCH_EVENTS: usize = 64;
/// ... or with the first event after the oldest held back is this old, and at its exit.
pub const BATCH_AGE: Duration = Duration::from_secs(1);

/// Keeps `event` in memory until the next [`record_direct`] (never writes now).
pub fn defer(event: Event) {
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let p = p.of_this_process();
    if p.events.len() < 1024 {
        p.events.push(event);
        p.since.get_or_insert_with(std::time::Instant::now);
    }
}

/// Writes what is held back when the process exits (`atexit`). A thread holding the queue at
/// that moment keeps it: the exit never waits.
extern "C" fn write_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let held = match PENDING.try_lock() {
            Ok(mut p) => std::mem::take(&mut p.of_this_process().events),
            Err(_) => return,
        };
        write_direct(held);
    });
}

/// Past this size, a direct-mode writer moves the spool into the database itself.
pub const SPOOL_IMPORT_BYTES: u64 = 4 * 1024 * 1024;

/// The spool file beside the database at `db`.
pub fn spool_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-spool");
    PathBuf::from(p)
}

/// Appends `events` to the spool of the database at `db` (one `write` of whole lines) and
/// returns the spool's size afterwards, asked on every 64th append of this process (0 otherwise).
pub fn spool_append(db: &Path, events: &[Event]) -> Result<u64, Error> {
    use std::io::Write as _;
    let spool = spool_path(db);
    let io = |source: std::io::Error| Error::Spool { path: spool.clone(), source };
    let mut buf = Vec::with_capacity(events.len() * 256);
    // Each line starts with a newline, so a line a killed writer left half-written spoils no
    // other: it stands alone, fails to parse and is skipped.
    for e in events {
        buf.push(b'\n');
        serde_json::to_writer(&mut buf, e).map_err(|e| io(e.into()))?;
    }
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&spool).map_err(io)?;
    f.write_all(&buf).map_err(io)?;
    // Its size matters only near the import threshold: asked every 64 appends of this process
    // (a system call saved on the others).
    static APPENDS: AtomicU64 = AtomicU64::new(0);
    if !APPENDS.fetch_add(1, Ordering::Relaxed).is_multiple_of(64) {
        return Ok(0);
    }
    Ok(f.metadata().map(|m| m.len()).unwrap_or(0))
}

/// Whether the file at `db`, if any, is an SQLite database (its first 16 bytes): a direct-mode
/// writer checks that much before it spools, so a file of garbage is warned about at once.
fn looks_like_a_database(db: &Path) -> Result<(), Error> {
    use std::io::Read as _;
    let mut head = [0u8; 16];
    match std::fs::File::open(db) {
        Ok(mut f) => {
            let n = f.read(&mut head).map_err(|source| Error::Dir { path: db.to_owned(), source })?;
            if n == 0 || head == *b"SQLite format 3\0" {
                Ok(())
            } else {
                Err(Error::Sqlite {
                    path: db.to_owned(),
                    source: rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
                        Some("file is not a database".into()),
                    ),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Dir { path: db.to_owned(), source }),
    }
}

/// Records `events` (and those [`defer`]red) from a process that has released its lock: appends
/// them to the spool, and moves the spool into the database once it is large. Never waits for
/// another writer; a database that cannot be used is warned about once per process; nothing is
/// ever returned to the caller.
///
/// Events are held back and appended a batch at a time (at most [`BATCH_EVENTS`], or
/// [`BATCH_AGE`] old), and at the process's normal exit; `record_direct(Vec::new())` writes at
/// once. A process killed by a signal loses what it held back (at most a second of events).
pub fn record_direct(events: Vec<Event>) {
    let flush = events.is_empty();
    let all = {
        let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        let p = p.of_this_process();
        p.events.extend(events);
        if p.events.is_empty() {
            return;
        }
        let since = *p.since.get_or_insert_with(std::time::Instant::now);
        // Held back only where the exit can write them (atexit).
        static AT_EXIT: OnceLock<bool> = OnceLock::new();
        let at_exit = *AT_EXIT.get_or_init(|| buildlock_sys::at_exit(write_at_exit));
        if at_exit && !flush && p.events.len() < BATCH_EVENTS && since.elapsed() < BATCH_AGE {
            return;
        }
        p.since = None;
        std::mem::take(&mut p.events)
    };
    write_direct(all);
}

/// Appends `all` to the spool (and imports the spool once it is large).
fn write_direct(all: Vec<Event>) {
    if all.is_empty() {
        return;
    }
    let Setting::At(db) = Setting::from_env() else { return };
    // The directory is looked for once per process (a system call per event otherwise).
    static DIR_THERE: AtomicBool = AtomicBool::new(false);
    if !DIR_THERE.load(Ordering::Relaxed) {
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            if let Err(source) = std::fs::create_dir_all(dir) {
                return warn_once(&Error::Dir { path: db.clone(), source });
            }
        }
        DIR_THERE.store(true, Ordering::Relaxed);
    }
    // The database's first bytes are checked once per process.
    static CHECKED: AtomicBool = AtomicBool::new(false);
    let checked = if CHECKED.load(Ordering::Relaxed) { Ok(()) } else { looks_like_a_database(&db) };
    CHECKED.store(checked.is_ok(), Ordering::Relaxed);
    let appended = checked.and_then(|()| spool_append(&db, &all));
    match appended {
        Ok(size) if size >= SPOOL_IMPORT_BYTES => match Store::open_with(&db, DIRECT_BUSY_TIMEOUT) {
            Ok(store) => {
                if let Err(e) = store.import_spool(Retention::from_env()) {
                    if is_busy(&e) {
                        tracing::debug!("lock history busy; the spool is imported later: {e}");
                    } else {
                        warn_once(&e);
                    }
                }
            }
            Err(e) if is_busy(&e) => tracing::debug!("lock history busy; the spool is imported later: {e}"),
            Err(e) => warn_once(&e),
        },
        Ok(_) => {}
        Err(e) => warn_once(&e),
    }
}

/// Whether history is on (`BUILDLOCK_HISTORY` is not `0`).
pub fn enabled() -> bool {
    Setting::from_env() != Setting::Off
}

/// How long `stats` and `history` wait for a writer.
pub const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens the history for reading, if it exists, waiting at most `busy` for a writer (`stats`
/// and `history`: [`READ_BUSY_TIMEOUT`]; the "usually" hint of a waiter: less). What
/// direct-mode writers spooled is moved into the database first, when it can be.
pub fn open_for_reading(busy: Duration) -> Result<Store, Error> {
    match Setting::from_env() {
        Setting::Off => Err(Error::Off),
        Setting::At(path) => {
            if spool_path(&path).exists() {
                match Store::open_with(&path, busy).and_then(|s| s.import_spool(Retention::from_env())) {
                    Ok(_) => {}
                    Err(e) => tracing::debug!("the spool of the lock history was not imported: {e}"),
                }
            }
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let sql = |source| Error::Sqlite { path: path.clone(), source };
            let conn = Connection::open_with_flags(&path, flags).map_err(sql)?;
            conn.busy_timeout(busy).map_err(sql)?;
            Ok(Store { conn, path })
        }
    }
}

/// How many events the background writer queues before it drops new ones.
const CHANNEL: usize = 8192;
/// At most this many events per transaction.
const BATCH: usize = 512;
/// How long the writer gathers events after the first of a batch. Events of the last moment
/// before the daemon is killed may be lost; that is the price of not committing each one.
const BATCH_WINDOW: Duration = Duration::from_millis(200);

/// A writer thread fed by a channel (the daemon's): [`Background::record`] never blocks.
#[derive(Debug, Clone)]
pub struct Background {
    tx: Option<SyncSender<Msg>>,
}

/// What the writer thread is sent. (Events travel unboxed: they are the traffic; a flush is
/// sent once, at exit.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(Event),
    /// Write what is queued now, then answer.
    Flush(SyncSender<()>),
}

impl Background {
    /// Starts the writer for `setting` (nothing at all when off). The database is opened by the
    /// thread, so a slow or broken one never holds up the caller.
    pub fn start(setting: Setting) -> Background {
        let Setting::At(path) = setting else { return Background { tx: None } };
        let (tx, rx) = mpsc::sync_channel(CHANNEL);
        let spawned = std::thread::Builder::new().name("buildlock-history".into()).spawn(move || writer(&path, &rx));
        match spawned {
            Ok(_) => Background { tx: Some(tx) },
            Err(e) => {
                tracing::warn!("cannot start the lock history writer: {e}; locking goes on without history");
                Background { tx: None }
            }
        }
    }

    /// Queues `event` for writing; drops it if the writer is behind or gone.
    pub fn record(&self, event: Event) {
        if let Some(tx) = &self.tx {
            match tx.try_send(Msg::Event(event)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => tracing::debug!("lock history writer is behind; an event was dropped"),
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// Has the writer write what is queued, waiting at most `limit` (a daemon about to exit:
    /// its last events are not lost to the batching window).
    pub fn flush(&self, limit: Duration) {
        if let Some(tx) = &self.tx {
            let (done, wait) = mpsc::sync_channel(1);
            if tx.try_send(Msg::Flush(done)).is_ok() {
                let _ = wait.recv_timeout(limit);
            }
        }
    }
}

/// The daemon's writer: opens the database, prunes, then writes what comes in batches.
fn writer(path: &Path, rx: &Receiver<Msg>) {
    let keep = Retention::from_env();
    let store = match Store::open(path) {
        Ok(s) => s,
        Err(e) => {
            warn_once(&e);
            // Drain so senders never see a full channel for long; write nothing.
            while let Ok(msg) = rx.recv() {
                if let Msg::Flush(done) = msg {
                    let _ = done.send(());
                }
            }
            return;
        }
    };
    if let Err(e) = store.prune(keep, now_ms()) {
        tracing::debug!("{e}");
    }
    let spool = spool_path(path);
    while let Ok(first) = rx.recv() {
        if spool.exists() {
            if let Err(e) = store.import_spool(keep) {
                tracing::debug!("{e}");
            }
        }
        // Gather for a moment: one transaction per burst, not per event (a commit costs more
        // than the rows, and the writer shares the processors with the daemon it serves).
        // The writer sleeps through the window rather than wait on the channel, so the events
        // that come meanwhile wake nobody (a wake per event costs the daemon more system calls
        // than the lock); a flush ends the window at once.
        let mut batch = Vec::new();
        let mut flushed = Vec::new();
        let mut next = Some(first);
        let until = std::time::Instant::now() + BATCH_WINDOW;
        loop {
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => batch.push(e),
                    Msg::Flush(done) => flushed.push(done),
                }
                if batch.len() >= BATCH || !flushed.is_empty() {
                    break;
                }
                next = rx.try_recv().ok();
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if batch.len() >= BATCH || !flushed.is_empty() || left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
            next = rx.try_recv().ok();
        }
        match store.insert_with(&batch, keep) {
            Ok(()) => {}
            Err(e) if is_busy(&e) => tracing::debug!("lock history busy; {} events dropped: {e}", batch.len()),
            Err(e) => warn_once(&e),
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// The process-wide [`Background`] writer for `BUILDLOCK_HISTORY`, started on first use.
pub fn background() -> &'static Background {
    static BG: OnceLock<Background> = OnceLock::new();
    BG.get_or_init(|| Background::start(Setting::from_env()))
}

#[cfg(test)]
mod tests;
