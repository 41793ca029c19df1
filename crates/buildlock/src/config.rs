//! The user's config file: which locks live where, and per-lock limits.
//!
//! `$BUILDLOCK_CONFIG`, else `$XDG_CONFIG_HOME/buildlock/config.toml`, else
//! `~/.config/buildlock/config.toml`. A missing file is an empty config. The first `[[locks]]`
//! entry whose `match` glob matches a lock's name applies to it:
//!
//! ```toml
//! [[locks]]
//! match = "deploy-*"
//! backend = "postgres://ci@db.internal/buildlock"   # or "local"
//! max_hold = "30m"
//!
//! [[locks]]
//! match = "artifact-cache"
//! backend = "postgres://ci@db.internal/buildlock?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The parsed config file.
#[derive(Debug, Default)]
pub struct Config {
    /// Where it was read from (`None`: no file).
    pub path: Option<PathBuf>,
    pub locks: Vec<LockRule>,
}

/// One `[[locks]]` entry.
#[derive(Debug)]
pub struct LockRule {
    /// The `match` glob, as written.
    pub pattern: String,
    matcher: globset::GlobMatcher,
    /// `backend`: a `postgres://` URL, or `local`. `None`: the default (local unless
    /// `--backend`/`BUILDLOCK_BACKEND` says otherwise).
    pub backend: Option<String>,
    /// `max_hold`: how long a holder may keep the lock.
    pub max_hold: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    locks: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: String,
    backend: Option<String>,
    max_hold: Option<String>,
}

/// A config file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("config file {}: {why}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub why: String,
}

/// The config file's path: `$BUILDLOCK_CONFIG`, else the user's config directory.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BUILDLOCK_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("buildlock").join("config.toml"))
}

impl Config {
    /// Reads the config file ([`config_path`]); a missing file is an empty config, but a file
    /// named by `BUILDLOCK_CONFIG` must exist.
    pub fn load() -> Result<Config, ConfigError> {
        let Some(path) = config_path() else { return Ok(Config::default()) };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("BUILDLOCK_CONFIG").is_none() => {
                Ok(Config::default())
            }
            Err(e) => Err(ConfigError { path, why: format!("cannot read it: {e}") }),
        }
    }

    /// Parses the text of a config file read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let bad = |why: String| ConfigError { path: path.to_owned(), why };
        let file: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut locks = Vec::new();
        for (i, raw) in file.locks.into_iter().enumerate() {
            let entry = format!("[[locks]] entry {} (match = {:?})", i + 1, raw.pattern);
            let matcher = globset::Glob::new(&raw.pattern)
                .map_err(|e| bad(format!("{entry}: not a glob: {e}")))?
                .compile_matcher();
            if let Some(b) = &raw.backend {
                if b != "local" && !b.starts_with("postgres://") && !b.starts_with("postgresql://") {
                    return Err(bad(format!(
                        "{entry}: backend {:?} is neither \"local\" nor a postgres:// URL",
                        buildlock_remote::redact(b)
                    )));
                }
            }
            let max_hold = match &raw.max_hold {
                Some(s) => Some(parse_duration(s).map_err(|why| bad(format!("{entry}: max_hold: {why}")))?),
                None => None,
            };
            locks.push(LockRule { pattern: raw.pattern, matcher, backend: raw.backend, max_hold });
        }
        Ok(Config { path: Some(path.to_owned()), locks })
    }

    /// The first entry matching lock `name`.
    pub fn rule_for(&self, name: &str) -> Option<&LockRule> {
        self.locks.iter().find(|r| r.matcher.is_match(name))
    }

    /// The backend URL the config routes lock `name` to (`Some("local")` when it pins it
    /// local), from the first matching entry that sets one.
    pub fn backend_for(&self, name: &str) -> Option<&str> {
        self.locks.iter().filter(|r| r.backend.is_some()).find(|r| r.matcher.is_match(name))?.backend.as_deref()
    }

    /// The backend URL lock `name` lives on: `backend` if given (`--backend`,
    /// `BUILDLOCK_BACKEND`, a library caller's setting), else this config's first matching
    /// entry; `None` for the lock directory (also when it says `local`).
    pub fn backend_url<'a>(&'a self, name: &str, backend: Option<&'a str>) -> Option<&'a str> {
        let url = backend.filter(|b| !b.is_empty()).or_else(|| self.backend_for(name))?;
        (url != "local").then_some(url)
    }

    /// The server lock `name` lives on ([`Config::backend_url`]), with remote timeout
    /// `remote_timeout`; `None` for the lock directory. An error names a bad URL or timeout.
    /// Parsing the URL may read `~/.pgpass`.
    pub fn remote_for(
        &self,
        name: &str,
        backend: Option<&str>,
        remote_timeout: Duration,
    ) -> Result<Option<std::sync::Arc<dyn buildlock_remote::Engine>>, buildlock_remote::Error> {
        let Some(url) = self.backend_url(name, backend) else { return Ok(None) };
        buildlock_remote::from_url(url)?.with_remote_timeout(remote_timeout).map(Some)
    }

    /// The `max_hold` for lock `name`, from the first matching entry that sets one.
    pub fn max_hold_for(&self, name: &str) -> Option<Duration> {
        self.locks.iter().filter(|r| r.max_hold.is_some()).find(|r| r.matcher.is_match(name))?.max_hold
    }

    /// The distinct remote backends the config names, for `status`.
    pub fn remote_backends(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for b in self.locks.iter().filter_map(|r| r.backend.as_deref()).filter(|b| *b != "local") {
            if !out.contains(&b) {
                out.push(b);
            }
        }
        out
    }

    /// Where `status` looks for remote locks, and whether only there: lock `name`'s server
    /// alone if it is remote (else none, and the lock directory); with no name, `backend`'s
    /// server alone (`--backend`), else every server this config names, before the lock
    /// directory's locks. The command line and the Python package list the same.
    pub fn status_servers<'a>(&'a self, name: Option<&str>, backend: Option<&'a str>) -> (Vec<&'a str>, bool) {
        match name {
            Some(name) => match self.backend_url(name, backend) {
                Some(url) => (vec![url], true),
                None => (Vec::new(), false),
            },
            None => match backend.filter(|b| !b.is_empty() && *b != "local") {
                Some(url) => (vec![url], true),
                None => (self.remote_backends(), false),
            },
        }
    }
}

/// The server lock `name` lives on, as every buildlock tool decides it: `backend` if given (a
/// URL, or `local`), else `$BUILDLOCK_BACKEND`, else the config file's first matching entry
/// ([`Config::load`]); `None` for the lock directory. Two tools that name a lock must agree on
/// where it lives, or they do not exclude each other: the command line, the library's
/// [`crate::Lock`] builder and the Python package all come here. Reads the config file and may
/// read `~/.pgpass`.
pub fn remote_for(
    name: &str,
    backend: Option<&str>,
    remote_timeout: Duration,
) -> Result<Option<std::sync::Arc<dyn buildlock_remote::Engine>>, crate::Error> {
    let env = std::env::var("BUILDLOCK_BACKEND").ok();
    let backend = backend.or(env.as_deref()).filter(|b| !b.is_empty());
    // A backend given (or in the environment) decides alone: the config file is not read.
    let config = match backend {
        Some(_) => Config::default(),
        None => Config::load()?,
    };
    Ok(config.remote_for(name, backend, remote_timeout)?)
}

/// Seconds (`90`, `2.5`) or a span (`90s`, `30m`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.trim().parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a number of seconds from 0 up"));
    }
    let d: jiff::SignedDuration = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: give seconds (`90`) or a span such as `90s`, `30m`, `1h30m`"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} is negative: give a duration from 0 up"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[[locks]]
match = "deploy-*"
backend = "postgres://ci@db.internal/buildlock"
max_hold = "30m"

[[locks]]
match = "deploy-local-*"
backend = "local"

[[locks]]
match = "*"
max_hold = "90"
"#;

    #[test]
    fn first_matching_entry_routes_and_limits() {
        let c = Config::parse(TEXT, Path::new("c.toml")).unwrap();
        assert_eq!(c.backend_for("deploy-staging"), Some("postgres://ci@db.internal/buildlock"));
        assert_eq!(c.backend_for("deploy-local-x"), Some("postgres://ci@db.internal/buildlock"), "first match wins");
        assert_eq!(c.backend_for("build"), None);
        assert_eq!(c.max_hold_for("deploy-staging"), Some(Duration::from_secs(1800)));
        assert_eq!(c.max_hold_for("build"), Some(Duration::from_secs(90)));
        assert_eq!(c.remote_backends(), vec!["postgres://ci@db.internal/buildlock"]);
    }

    #[test]
    fn bad_entries_name_the_file_and_the_entry() {
        for (text, says) in [
            ("[[locks]]\nmatch = \"a[\"\n", "entry 1 (match = \"a[\"): not a glob"),
            ("[[locks]]\nmatch = \"a\"\nbackend = \"mysql://u:pw@h\"\n", "neither \"local\" nor a postgres:// URL"),
            ("[[locks]]\nmatch = \"a\"\nmax_hold = \"soon\"\n", "max_hold: \"soon\" is not a duration"),
            ("[[locks]]\nmatch = \"a\"\nbackned = \"local\"\n", "unknown field `backned`"),
        ] {
            let e = Config::parse(text, Path::new("/etc/c.toml")).unwrap_err().to_string();
            assert!(e.starts_with("config file /etc/c.toml: ") && e.contains(says), "{e}");
            assert!(!e.contains(":pw@"), "{e}");
        }
    }
}
