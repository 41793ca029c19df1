//! `.lock.pid` metadata: who holds a lock, written after acquiring and removed before releasing.
//!
//! The format is the JSON object the original Python tool writes, so old readers keep working:
//!
//! ```json
//! {"pid": 12345, "timestamp": "2026-02-14T06:50:11.123456", "operation": "build:libfastled_build",
//!  "hostname": "myhost"}
//! ```
//!
//! buildlock adds keys old readers ignore: `start_time` and `boot_id` (so a recycled pid is not
//! taken for the holder), `mode`, `command`, `lock` (`"os"` or `"soft"`), `id` (one per
//! acquisition), `version`, and `via_pid` (the `run` that started the holder, when the holder is
//! a command it passed the lock to). Readers accept the timestamp as naive local ISO 8601 or as a float
//! of seconds since the epoch, and treat anything unreadable (empty, truncated, binary, huge,
//! wrong types) as "no metadata".

use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use buildlock_sys::{LockMode, ProcessIdentity};
use jiff::{civil::DateTime, tz::TimeZone, Timestamp};
use serde_json::Value;

/// Metadata files larger than this are not metadata; they are read as corrupt.
pub const MAX_METADATA_BYTES: u64 = 64 * 1024;

/// The value of the `version` key buildlock writes.
pub const FORMAT_VERSION: &str = "buildlock/1";

/// Who holds (or held) a lock, as read from or written to metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Metadata {
    pub pid: u32,
    /// When the lock was taken; `None` when the writer gave no readable time.
    pub timestamp: Option<Timestamp>,
    pub operation: String,
    pub hostname: String,
    pub start_time: Option<u64>,
    pub boot_id: Option<String>,
    pub mode: Option<LockMode>,
    pub command: Option<String>,
    /// `"os"` or `"soft"`; absent in files written by other tools.
    pub lock: Option<String>,
    /// The fencing token of this acquisition (see [`crate::fence`]).
    pub token: Option<u64>,
    /// Unique per acquisition, so a holder removes only its own metadata.
    pub id: Option<String>,
    pub version: Option<String>,
    /// The process that took the lock on the holder's behalf and handed it over, if the holder
    /// did not take it itself: `buildlock-client run` names the command it started as the
    /// holder, and itself here. If that process is gone, the holder still holds the lock.
    pub via_pid: Option<u32>,
    /// The holder's `--max-hold`, in milliseconds: past it, `run` (and the daemon) stop it.
    pub max_hold_ms: Option<u64>,
}

/// What reading a metadata file found.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // short-lived, read once per look at a lock
pub enum MetaRead {
    /// No file.
    Missing,
    /// A file that is not usable metadata; the text says why.
    Corrupt(String),
    Valid(Metadata),
}

impl MetaRead {
    pub fn valid(&self) -> Option<&Metadata> {
        match self {
            MetaRead::Valid(m) => Some(m),
            _ => None,
        }
    }

    /// Whether the file read is one this tool may remove or replace: absent, empty, or metadata
    /// it recognises (ours or the seed tool's). Anything else is somebody's file, left alone.
    pub fn is_recognised(&self) -> bool {
        !matches!(self, MetaRead::Corrupt(_))
    }
}

impl Metadata {
    /// Metadata naming this process as the holder, taken now.
    pub fn for_current_process(mode: LockMode, lock: &str, operation: &str, command: Option<String>) -> Metadata {
        Metadata::for_process(buildlock_sys::current_process(), mode, lock, operation, command)
    }

    /// Metadata naming process `me` as the holder, taken now (the daemon writes it for clients).
    pub fn for_process(
        me: ProcessIdentity,
        mode: LockMode,
        lock: &str,
        operation: &str,
        command: Option<String>,
    ) -> Metadata {
        Metadata {
            pid: me.pid,
            timestamp: Some(Timestamp::now()),
            operation: operation.to_owned(),
            hostname: buildlock_sys::hostname(),
            start_time: me.start_time,
            boot_id: me.boot_id,
            mode: Some(mode),
            command,
            lock: Some(lock.to_owned()),
            token: None,
            id: Some(unique_id()),
            version: Some(FORMAT_VERSION.to_owned()),
            via_pid: None,
            max_hold_ms: None,
        }
    }

    /// The same acquisition (id, token, time), now held by process `to` with `command`, which
    /// the process `via` handed the lock to (`run` passing it to its command).
    pub fn handed_over(&self, to: ProcessIdentity, command: Option<String>, via: u32) -> Metadata {
        Metadata {
            pid: to.pid,
            start_time: to.start_time,
            boot_id: to.boot_id,
            command: command.or_else(|| self.command.clone()),
            via_pid: Some(via),
            ..self.clone()
        }
    }

    /// The process this metadata names.
    pub fn process(&self) -> ProcessIdentity {
        ProcessIdentity { pid: self.pid, start_time: self.start_time, boot_id: self.boot_id.clone() }
    }

    /// Whether this metadata describes a soft lock (whose existence is the lock).
    pub fn is_soft(&self) -> bool {
        self.lock.as_deref() == Some("soft")
    }

    /// The JSON text written to disk: one object, keys in alphabetical order (as a
    /// `serde_json::Map` writes them, which earlier versions used), written straight into one
    /// string: this runs on every acquisition.
    pub fn to_json(&self) -> String {
        let mut w = JsonObject(Vec::with_capacity(320));
        if let Some(v) = &self.boot_id {
            w.str("boot_id", v);
        }
        if let Some(v) = &self.command {
            w.str("command", v);
        }
        w.str("hostname", &self.hostname);
        if let Some(v) = &self.id {
            w.str("id", v);
        }
        if let Some(v) = &self.lock {
            w.str("lock", v);
        }
        if let Some(v) = self.max_hold_ms {
            w.num("max_hold_ms", v);
        }
        if let Some(m) = self.mode {
            w.str("mode", m.as_str());
        }
        w.str("operation", &self.operation);
        w.num("pid", u64::from(self.pid));
        if let Some(v) = self.start_time {
            w.num("start_time", v);
        }
        w.key("timestamp");
        match self.timestamp {
            Some(t) => write_timestamp(&mut w.0, t),
            None => w.0.extend_from_slice(b"null"),
        }
        if let Some(v) = self.token {
            w.num("token", v);
        }
        if let Some(v) = &self.version {
            w.str("version", v);
        }
        if let Some(v) = self.via_pid {
            w.num("via_pid", u64::from(v));
        }
        w.finish()
    }

    /// Parses metadata text; `Err` says why it is not usable.
    pub fn parse(bytes: &[u8]) -> Result<Metadata, String> {
        if bytes.len() as u64 > MAX_METADATA_BYTES {
            return Err(format!("metadata is {} bytes, more than the {MAX_METADATA_BYTES} allowed", bytes.len()));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err("metadata file is empty".into());
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("metadata is not valid JSON ({e})"))?;
        let obj = value.as_object().ok_or("metadata is not a JSON object")?;
        let pid = obj
            .get("pid")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0)
            .ok_or("metadata has no valid \"pid\"")?;
        let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(Metadata {
            pid,
            timestamp: obj.get("timestamp").and_then(parse_timestamp),
            operation: text("operation").unwrap_or_default(),
            hostname: text("hostname").unwrap_or_default(),
            start_time: obj.get("start_time").and_then(Value::as_u64),
            boot_id: text("boot_id"),
            mode: match obj.get("mode").and_then(Value::as_str) {
                Some("shared") => Some(LockMode::Shared),
                Some("exclusive") => Some(LockMode::Exclusive),
                _ => None,
            },
            command: text("command"),
            lock: text("lock"),
            token: obj.get("token").and_then(Value::as_u64),
            id: text("id"),
            version: text("version"),
            via_pid: obj.get("via_pid").and_then(Value::as_u64).and_then(|p| u32::try_from(p).ok()),
            max_hold_ms: obj.get("max_hold_ms").and_then(Value::as_u64),
        })
    }
}

/// A JSON object being written: `{` and the commas come with the keys.
struct JsonObject(Vec<u8>);

impl JsonObject {
    fn key(&mut self, key: &str) {
        self.0.push(if self.0.is_empty() { b'{' } else { b',' });
        self.string(key);
        self.0.push(b':');
    }

    /// `value` as a JSON string, escaped as serde_json escapes it.
    fn string(&mut self, value: &str) {
        // Writing a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut self.0, value);
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.string(value);
    }

    fn num(&mut self, key: &str, value: u64) {
        self.key(key);
        self.0.extend_from_slice(value.to_string().as_bytes());
    }

    fn finish(mut self) -> String {
        if self.0.is_empty() {
            self.0.push(b'{');
        }
        self.0.push(b'}');
        // Only `str`s and ASCII went in.
        String::from_utf8(self.0).unwrap_or_default()
    }
}

/// A timestamp as the seed's tool writes it: naive local ISO 8601 with microseconds
/// (`2026-02-14T06:50:11.123456`), as a JSON string. Years outside 0..=9999 have no such form
/// (ISO wants a signed six-digit year there, which old readers do not know), so those are
/// written as seconds since the epoch, which every reader accepts.
fn write_timestamp(out: &mut Vec<u8>, t: Timestamp) {
    use std::io::Write as _;
    let local = t.to_zoned_datetime(local_tz()).datetime();
    // Writing into a `Vec` cannot fail.
    let _ = if (0..=9999).contains(&local.year()) {
        write!(
            out,
            "\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}\"",
            local.year(),
            local.month(),
            local.day(),
            local.hour(),
            local.minute(),
            local.second(),
            local.subsec_nanosecond() / 1000
        )
    } else {
        serde_json::to_writer(&mut *out, &(t.as_second() as f64 + f64::from(t.subsec_nanosecond()) / 1e9))
            .map_err(std::io::Error::from)
    };
}

/// Reads timestamps as the seed's tool and others write them: naive local ISO 8601, ISO 8601
/// with an offset, or a number of seconds since the epoch.
fn parse_timestamp(v: &Value) -> Option<Timestamp> {
    match v {
        Value::Number(n) => {
            let secs = n.as_f64()?;
            if !secs.is_finite() {
                return None;
            }
            let whole = secs.floor();
            let nanos = ((secs - whole) * 1e9) as i32;
            Timestamp::new(whole as i64, nanos).ok()
        }
        Value::String(s) => s.parse::<Timestamp>().ok().or_else(|| {
            s.parse::<DateTime>().ok().and_then(|dt| dt.to_zoned_datetime(local_tz()).ok()).map(|z| z.timestamp())
        }),
        _ => None,
    }
}

/// The local time zone, found once per process. Where `/etc/localtime` exists (and `TZ` is
/// unset) it is read directly: jiff's general lookup first indexes the whole zoneinfo database,
/// which costs milliseconds on every CLI call.
pub fn local_tz() -> TimeZone {
    static TZ: OnceLock<TimeZone> = OnceLock::new();
    TZ.get_or_init(|| {
        if std::env::var_os("TZ").is_none() {
            if let Ok(Ok(tz)) = fs::read("/etc/localtime").map(|data| TimeZone::tzif("localtime", &data)) {
                return tz;
            }
        }
        TimeZone::system()
    })
    .clone()
}

/// A string unique to this acquisition: pid, time and a process-wide counter.
pub fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = Timestamp::now();
    format!("{}-{}{:09}-{n}", buildlock_sys::current_pid(), now.as_second(), now.subsec_nanosecond())
}

/// Reads the metadata at `path`, never failing: problems become [`MetaRead::Corrupt`].
///
/// The file is opened without following a symbolic link and without blocking, and must be a
/// regular file of at most [`MAX_METADATA_BYTES`]: a link, FIFO or directory planted at `path`
/// is corrupt metadata, never a hang.
pub fn read(path: &Path) -> MetaRead {
    let file = match buildlock_sys::fs::open_regular_nonblocking(path, MAX_METADATA_BYTES) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return MetaRead::Missing,
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            return MetaRead::Corrupt(format!("{e}, too big for lock metadata"))
        }
        Err(e) => return MetaRead::Corrupt(format!("cannot read {}: {e}", path.display())),
    };
    read_from(file)
}

/// Reads metadata from an open file (used for soft locks, whose lock file holds it).
pub fn read_from(file: impl Read) -> MetaRead {
    // Room for metadata as written (a few hundred bytes) at once: one read, and one to see the end.
    let mut buf = Vec::with_capacity(1024);
    // Read one byte more than allowed, to tell "too big" from "exactly at the limit".
    if let Err(e) = file.take(MAX_METADATA_BYTES + 1).read_to_end(&mut buf) {
        return MetaRead::Corrupt(format!("cannot read metadata: {e}"));
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return MetaRead::Missing; // an empty file says nothing: no metadata
    }
    match Metadata::parse(&buf) {
        Ok(m) => MetaRead::Valid(m),
        Err(why) => MetaRead::Corrupt(why),
    }
}

/// A temporary file next to `path`, unique to this call, for writing then renaming or linking.
pub(crate) fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", unique_id()))
}

/// Writes `meta` to `path` so that readers see the old file or the whole new one, never a part:
/// write a temporary file in the same directory, then rename it over `path`.
/// The temporary file is created exclusively, so a link planted at either name is replaced,
/// never written through.
pub fn write_atomic(path: &Path, meta: &Metadata) -> io::Result<()> {
    buildlock_sys::fs::replace_file(path, meta.to_json().as_bytes())
}

/// Puts `meta` at `path` atomically, as [`write_atomic`] does, but replaces a file already
/// there only if `may_replace` (asked only then; it may read the file) agrees. `Ok(None)`: left
/// alone. The stamp returned lets the writer remove exactly this file later
/// ([`remove_if_ours_stamped`]) without reading it back.
pub fn install(
    path: &Path,
    meta: &Metadata,
    may_replace: &mut dyn FnMut() -> bool,
) -> io::Result<Option<buildlock_sys::fs::FileStamp>> {
    buildlock_sys::fs::install_file(path, meta.to_json().as_bytes(), may_replace)
}

/// The file an exclusive holder's metadata is kept in between holders (`X.lock.pid.spare`):
/// the next exclusive holder rewrites it and links it to `X.lock.pid` (a second name for the
/// same file); the release removes that name, so no file is created or deleted per acquisition.
/// Only touched while holding the lock exclusively; never read.
pub fn spare_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".spare");
    std::path::PathBuf::from(p)
}

/// [`install`] for an exclusive holder: the spare file ([`spare_path`]) is rewritten and
/// linked into place when there is one (of ours, regular, with no other name), else a new file
/// is renamed into place.
pub fn install_exclusive(
    path: &Path,
    meta: &Metadata,
    may_replace: &mut dyn FnMut() -> bool,
) -> io::Result<Option<buildlock_sys::fs::FileStamp>> {
    buildlock_sys::fs::install_file_reusing(path, &spare_path(path), meta.to_json().as_bytes(), may_replace)
}

/// The second file kept beside an exclusive holder's metadata (`X.lock.pid.next`): a hand-over
/// ([`replace_exclusive`]) writes the new metadata into it and renames it over `X.lock.pid`
/// (the old metadata file keeps its other name, the spare); the release renames it back. Never
/// read.
pub fn next_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".next");
    std::path::PathBuf::from(p)
}

/// Replaces an exclusive holder's own metadata at `path` with `meta`, atomically, through the
/// kept file [`next_path`] (no flush, no file created or freed once it exists:
/// `buildlock_sys::fs::replace_file_keeping`).
pub fn replace_exclusive(path: &Path, meta: &Metadata) -> io::Result<buildlock_sys::fs::FileStamp> {
    buildlock_sys::fs::replace_file_keeping(path, meta.to_json().as_bytes(), &next_path(path))
}

/// Removes the metadata at `path` if it is the very file whose `stamp` [`install`] returned
/// (an exclusive holder's loses the name it shares with the spare, or goes back to the spare or
/// the hand-over's kept file when it has no other name); if the file there is another one,
/// only if it names the acquisition `id` ([`remove_if_ours`]).
pub fn remove_if_ours_stamped(
    path: &Path,
    id: &str,
    stamp: Option<&buildlock_sys::fs::FileStamp>,
    exclusive: bool,
) -> io::Result<bool> {
    if let Some(stamp) = stamp {
        let gone = if exclusive {
            buildlock_sys::fs::retire_if_stamp(path, stamp, &[&spare_path(path), &next_path(path)])?
        } else {
            buildlock_sys::fs::remove_if_stamp(path, stamp)?
        };
        if gone {
            return Ok(true);
        }
    }
    remove_if_ours(path, id)
}

/// Removes the metadata at `path` if it names the acquisition `id`; leaves anyone else's alone.
pub fn remove_if_ours(path: &Path, id: &str) -> io::Result<bool> {
    match read(path) {
        MetaRead::Valid(m) if m.id.as_deref() == Some(id) => match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    /// The timestamp as earlier versions wrote it (`jiff`'s `strftime`).
    fn timestamp_json(t: Timestamp) -> Value {
        let local = t.to_zoned_datetime(local_tz()).datetime();
        if (0..=9999).contains(&local.year()) {
            json!(local.strftime("%Y-%m-%dT%H:%M:%S%.6f").to_string())
        } else {
            json!(t.as_second() as f64 + f64::from(t.subsec_nanosecond()) / 1e9)
        }
    }

    #[test]
    fn reads_the_seed_tools_format() {
        let m = Metadata::parse(
            br#"{"pid": 12345, "timestamp": "2026-02-14T06:50:11.123456", "operation": "build:libfastled_build", "hostname": "myhost"}"#,
        )
        .unwrap();
        assert_eq!(m.pid, 12345);
        assert_eq!(m.operation, "build:libfastled_build");
        assert_eq!(m.hostname, "myhost");
        let local = m.timestamp.unwrap().to_zoned_datetime(local_tz()).datetime();
        assert_eq!(local.to_string(), "2026-02-14T06:50:11.123456");
        assert_eq!(m.start_time, None);
        assert!(!m.is_soft());
    }

    #[test]
    fn reads_float_and_offset_timestamps() {
        let m = Metadata::parse(br#"{"pid": 7, "timestamp": 1771051811.5}"#).unwrap();
        assert_eq!(m.timestamp.unwrap(), Timestamp::new(1771051811, 500_000_000).unwrap());
        let m = Metadata::parse(br#"{"pid": 7, "timestamp": "2026-02-14T06:50:11Z"}"#).unwrap();
        assert_eq!(m.timestamp.unwrap().as_second(), 1771051811);
        // An unreadable timestamp loses the time, not the holder.
        let m = Metadata::parse(br#"{"pid": 7, "timestamp": "yesterday"}"#).unwrap();
        assert_eq!((m.pid, m.timestamp), (7, None));
    }

    #[test]
    fn garbage_is_corrupt_not_a_crash() {
        let huge = vec![b'x'; MAX_METADATA_BYTES as usize + 10];
        assert!(Metadata::parse(b"").is_err());
        assert_eq!(read_from(&b""[..]), MetaRead::Missing);
        assert_eq!(read_from(&b" \n"[..]), MetaRead::Missing);
        let cases: &[&[u8]] = &[
            b"{\"pid\": 12",
            b"\x00\xff\xfe binary",
            b"[1,2,3]",
            b"{\"pid\": -4}",
            b"{\"pid\": 0}",
            b"{\"pid\": 1.5}",
            b"{\"pid\": \"12\"}",
            b"{\"pid\": 99999999999}",
            b"{\"timestamp\": 1}",
            b"null",
            &huge,
        ];
        for case in cases {
            assert!(
                Metadata::parse(case).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(&case[..case.len().min(40)])
            );
            assert!(matches!(read_from(*case), MetaRead::Corrupt(_)));
        }
    }

    /// The JSON text as earlier versions wrote it (through a `serde_json::Value`).
    fn to_json_through_value(m: &Metadata) -> String {
        let mut obj = Map::new();
        obj.insert("pid".into(), json!(m.pid));
        obj.insert("timestamp".into(), m.timestamp.map_or(Value::Null, timestamp_json));
        obj.insert("operation".into(), json!(m.operation));
        obj.insert("hostname".into(), json!(m.hostname));
        let mut opt = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                obj.insert(k.into(), v);
            }
        };
        opt("start_time", m.start_time.map(|v| json!(v)));
        opt("boot_id", m.boot_id.as_ref().map(|v| json!(v)));
        opt("mode", m.mode.map(|m| json!(m.as_str())));
        opt("command", m.command.as_ref().map(|v| json!(v)));
        opt("lock", m.lock.as_ref().map(|v| json!(v)));
        opt("token", m.token.map(|v| json!(v)));
        opt("id", m.id.as_ref().map(|v| json!(v)));
        opt("version", m.version.as_ref().map(|v| json!(v)));
        opt("via_pid", m.via_pid.map(|v| json!(v)));
        opt("max_hold_ms", m.max_hold_ms.map(|v| json!(v)));
        Value::Object(obj).to_string()
    }

    #[test]
    fn to_json_writes_what_a_serde_json_map_wrote() {
        let mut m =
            Metadata::for_current_process(LockMode::Exclusive, "os", "build:\"x\"\n\u{1}é/", Some("make -j8".into()));
        m.token = Some(42);
        m.max_hold_ms = Some(7);
        m.via_pid = Some(3);
        assert_eq!(m.to_json(), to_json_through_value(&m));
        let bare = Metadata {
            timestamp: None,
            start_time: None,
            boot_id: None,
            mode: None,
            command: None,
            lock: None,
            id: None,
            version: None,
            ..m.clone()
        };
        assert_eq!(bare.to_json(), to_json_through_value(&bare));
        for secs in [
            0,
            1,
            59,
            1_000_000_007,
            1_800_000_000,
            -1,
            -62_167_219_201,
            -62_000_000_000,
            253_402_200_000,
            253_402_207_200,
        ] {
            for nanos in [0, 999, 1000, 123_456_789, 999_999_999] {
                let t = Timestamp::new(secs, nanos).unwrap();
                let m = Metadata { timestamp: Some(t), ..m.clone() };
                assert_eq!(m.to_json(), to_json_through_value(&m), "{t}");
            }
        }
    }

    #[test]
    fn round_trips_and_keeps_the_old_keys() {
        let m = Metadata::for_current_process(LockMode::Shared, "os", "build:x", Some("make -j8".into()));
        let text = m.to_json();
        let v: Value = serde_json::from_str(&text).unwrap();
        for key in ["pid", "timestamp", "operation", "hostname"] {
            assert!(v.get(key).is_some(), "missing {key} in {text}");
        }
        // The seed's naive local format, microseconds, no offset.
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-02-14T06:50:11.123456".len(), "{ts}");
        let back = Metadata::parse(text.as_bytes()).unwrap();
        assert_eq!(back.pid, m.pid);
        assert_eq!(back.id, m.id);
        assert_eq!(back.mode, Some(LockMode::Shared));
        assert_eq!(back.command.as_deref(), Some("make -j8"));
        let delta = back.timestamp.unwrap().duration_since(m.timestamp.unwrap());
        assert!(delta.as_secs_f64().abs() < 1e-5);
    }

    const PADDED_HEAD: &[u8] = br#"{"pid": 7, "command": ""#;
    const PADDED_TAIL: &[u8] = br#""}"#;

    /// Valid metadata padded with a long command to exactly `len` bytes.
    fn metadata_of_len(len: usize) -> Vec<u8> {
        let mut text = PADDED_HEAD.to_vec();
        text.resize(len - PADDED_TAIL.len(), b'x');
        text.extend_from_slice(PADDED_TAIL);
        text
    }

    #[test]
    fn metadata_up_to_the_size_limit_is_read_and_one_byte_more_is_not() {
        let max = MAX_METADATA_BYTES as usize;
        assert_eq!(max, 65_536);
        let at_limit = metadata_of_len(max);
        assert_eq!(
            Metadata::parse(&at_limit).unwrap().command.unwrap().len(),
            max - PADDED_HEAD.len() - PADDED_TAIL.len()
        );
        assert!(matches!(read_from(&at_limit[..]), MetaRead::Valid(m) if m.pid == 7));
        // One trailing space too many: still JSON, but past the limit, so not metadata.
        let mut over = at_limit.clone();
        over.push(b' ');
        assert!(Metadata::parse(&over).unwrap_err().contains("65537 bytes"));
        assert!(matches!(read_from(&over[..]), MetaRead::Corrupt(why) if why.contains("more than")));
        // Through a path, an oversized file is refused before it is read, and said to be.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock.pid");
        fs::write(&path, &at_limit).unwrap();
        assert!(read(&path).valid().is_some());
        fs::write(&path, &over).unwrap();
        assert!(matches!(read(&path), MetaRead::Corrupt(why) if why.contains("too big for lock metadata")));
    }

    #[test]
    fn something_other_than_a_file_is_corrupt_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock.pid");
        fs::create_dir(&path).unwrap();
        let found = read(&path);
        assert!(matches!(&found, MetaRead::Corrupt(why) if why.contains("cannot read")), "{found:?}");
        assert!(!found.is_recognised(), "a directory is not ours to remove");
    }

    #[test]
    fn only_corrupt_metadata_is_unrecognised() {
        assert!(MetaRead::Missing.is_recognised());
        assert!(!MetaRead::Corrupt("x".into()).is_recognised());
        let m = Metadata::for_current_process(LockMode::Exclusive, "soft", "build", None);
        assert!(MetaRead::Valid(m).is_recognised());
    }

    #[test]
    fn exclusive_soft_metadata_round_trips() {
        let m = Metadata::for_current_process(LockMode::Exclusive, "soft", "build:x", None);
        assert!(m.is_soft());
        let back = Metadata::parse(m.to_json().as_bytes()).unwrap();
        assert_eq!(back.mode, Some(LockMode::Exclusive));
        assert!(back.is_soft());
    }

    #[test]
    fn a_handed_over_lock_names_the_new_holder_and_who_handed_it() {
        let m = Metadata::for_current_process(LockMode::Exclusive, "os", "build:x", Some("run make".into()));
        let m = Metadata { token: Some(42), ..m };
        let to = ProcessIdentity { pid: 999_999, start_time: Some(5), boot_id: Some("other-boot".into()) };
        let h = m.handed_over(to.clone(), Some("make -j8".into()), m.pid);
        assert_eq!(h.process(), to);
        assert_eq!((h.command.as_deref(), h.via_pid), (Some("make -j8"), Some(m.pid)));
        // The same acquisition: id, token, time, operation and mode are kept.
        assert_eq!(
            (&h.id, h.token, h.timestamp, &h.operation, h.mode),
            (&m.id, m.token, m.timestamp, &m.operation, m.mode)
        );
        // Without a command of its own, the holder keeps the one recorded.
        assert_eq!(m.handed_over(to, None, 1).command.as_deref(), Some("run make"));
    }

    #[test]
    fn temporary_files_are_hidden_unique_and_beside_the_target() {
        let path = Path::new("/locks/x.lock");
        let (a, b) = (temp_path(path), temp_path(path));
        assert_ne!(a, b);
        for t in [&a, &b] {
            assert_eq!(t.parent(), path.parent());
            let name = t.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(".x.lock.") && name.ends_with(".tmp"), "{name}");
        }
    }

    #[test]
    fn write_is_atomic_and_remove_only_takes_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock.pid");
        let a = Metadata::for_current_process(LockMode::Exclusive, "os", "a", None);
        write_atomic(&path, &a).unwrap();
        assert_eq!(read(&path).valid().unwrap().id, a.id);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let b = Metadata::for_current_process(LockMode::Exclusive, "os", "b", None);
        assert!(!remove_if_ours(&path, b.id.as_deref().unwrap()).unwrap());
        assert!(path.exists());
        assert!(remove_if_ours(&path, a.id.as_deref().unwrap()).unwrap());
        assert_eq!(read(&path), MetaRead::Missing);
    }
}
