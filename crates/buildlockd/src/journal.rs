//! The journal of bound leases, so that a double crash loses no lease silently.
//!
//! A lease bound to a process (`acquire --pid`'s script, `run`'s command) is kept by two
//! processes: its client (the keeper, `run`) and the daemon; on Linux both hold a copy of the
//! locked descriptor. One crash loses nothing. If both die while the bound process lives, no
//! process holds the lock any more. So every bound lease has an entry here, in
//! `<runtime dir>/leases/`, one file each (its metadata and lock path, written by rename), removed
//! when the lease ends; a daemon started later reads them before it serves anyone (see
//! `Daemon::recover`): it re-takes the lock for a bound process that still lives, or, when
//! another process took the lock meanwhile, records the loss beside the lock
//! (`buildlock_disk::lost`) for `status`, every acquirer and the script's own `release`.

use std::path::{Path, PathBuf};

use buildlock_disk::Metadata;
use serde_json::{json, Value};

pub(crate) struct Journal {
    dir: PathBuf,
}

/// One bound lease as journaled.
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) path: PathBuf,
    pub(crate) meta: Metadata,
}

impl Journal {
    pub(crate) fn new(runtime_dir: &Path) -> Journal {
        Journal { dir: runtime_dir.join(buildlock_proto::transport::JOURNAL_DIR) }
    }

    fn file(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Records (or updates) the bound lease on `path` whose holder is `meta` (the bound process,
    /// with the lease's token). Returns its key (the entry's file name, which a client that
    /// releases the lease without the daemon computes too), or `None` (with a warning) when it
    /// cannot be written: the lease stands, unjournaled.
    pub(crate) fn record(&self, path: &Path, meta: &Metadata) -> Option<String> {
        let file = buildlock_proto::transport::journal_entry(
            self.dir.parent().unwrap_or(&self.dir),
            path,
            meta.token.unwrap_or(0),
            meta.pid,
        );
        let key = file.file_stem()?.to_string_lossy().into_owned();
        let text = json!({ "path": path, "meta": meta.to_json() }).to_string();
        let written = buildlock_sys::ipc::ensure_private_dir(&self.dir)
            .map_err(std::io::Error::other)
            .and_then(|()| buildlock_sys::fs::replace_file_with_mode(&file, text.as_bytes(), 0o600));
        match written {
            Ok(()) => Some(key),
            Err(e) => {
                tracing::warn!(
                    "cannot journal the lease on {} bound to pid {} in {}: {e}; if both its client and this \
                     daemon die, it cannot be recovered",
                    path.display(),
                    meta.pid,
                    self.dir.display()
                );
                None
            }
        }
    }

    /// Whether the entry `key` is still there (a client that gives its lease up without the
    /// daemon removes it).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.file(key).exists()
    }

    pub(crate) fn forget(&self, key: &str) {
        match std::fs::remove_file(self.file(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", self.file(key).display()),
        }
    }

    /// Every readable entry; unreadable ones are reported and removed.
    pub(crate) fn entries(&self) -> Vec<Entry> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json") else { continue };
            match read_entry(&e.path()) {
                Some((path, meta)) => out.push(Entry { key: key.to_owned(), path, meta }),
                None => {
                    tracing::warn!("ignoring and removing the unreadable journal entry {}", e.path().display());
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        out
    }
}

fn read_entry(file: &Path) -> Option<(PathBuf, Metadata)> {
    use std::io::Read;
    let f = buildlock_sys::fs::open_regular_nonblocking(file, 2 * buildlock_disk::meta::MAX_METADATA_BYTES).ok()?;
    let mut text = String::new();
    (&f).read_to_string(&mut text).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let path = PathBuf::from(v.get("path")?.as_str()?);
    let meta = Metadata::parse(v.get("meta")?.as_str()?.as_bytes()).ok()?;
    Some((path, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path().join("rt");
        std::fs::create_dir(&rt).unwrap();
        std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let j = Journal::new(&rt);
        let meta = Metadata::for_current_process(buildlock_sys::LockMode::Exclusive, "os", "deploy", None);
        let key = j.record(Path::new("/locks/x.lock"), &meta).unwrap();
        std::fs::write(j.dir.join("junk.json"), "{").unwrap();
        let entries = j.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key, key);
        assert_eq!(entries[0].path, Path::new("/locks/x.lock"));
        assert_eq!(entries[0].meta.id, meta.id);
        assert!(!j.dir.join("junk.json").exists());
        j.forget(&key);
        assert!(j.entries().is_empty());
    }
}
