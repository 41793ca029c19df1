//! `daemon install` and `daemon uninstall`: hand the daemon to the service manager the user
//! already runs (systemd's user manager, or launchd), or say exactly what to run.
//!
//! Both are idempotent and say what they changed. `BUILDLOCK_SYSTEMCTL` / `BUILDLOCK_LAUNCHCTL`
//! name the tool to call (`none`: never call it, only print the commands).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::{fail, Context};

const SOCKET_UNIT: &str = include_str!("../systemd/buildlockd.socket");
const SERVICE_UNIT: &str = include_str!("../systemd/buildlockd.service");
const PLIST: &str = include_str!("../launchd/dev.buildlock.buildlockd.plist");
const LABEL: &str = "dev.buildlock.buildlockd";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Manager {
    Systemd,
    Launchd,
}

impl Manager {
    /// `--systemd` / `--launchd`, else the platform's own.
    pub(crate) fn pick(systemd: bool, launchd: bool) -> Manager {
        match (systemd, launchd) {
            (true, _) => Manager::Systemd,
            (_, true) => Manager::Launchd,
            _ if cfg!(target_os = "macos") => Manager::Launchd,
            _ => Manager::Systemd,
        }
    }
}

pub(crate) fn install(cx: &Context, manager: Manager) -> ExitCode {
    let bin = match installed_daemon() {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let result = match manager {
        Manager::Systemd => install_systemd(cx, &bin),
        Manager::Launchd => install_launchd(cx, &bin),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

pub(crate) fn uninstall(cx: &Context, manager: Manager) -> ExitCode {
    let result = match manager {
        Manager::Systemd => uninstall_systemd(cx),
        Manager::Launchd => uninstall_launchd(cx),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// The absolute path of the `buildlockd` that clients would start.
fn installed_daemon() -> Result<PathBuf, String> {
    let bin = buildlock::daemon_binary();
    let found = if bin.components().count() > 1 {
        Some(bin.clone())
    } else {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(&bin)).find(|c| c.is_file()))
    };
    match found.and_then(|p| p.canonicalize().ok()).filter(|p| p.is_file()) {
        Some(p) => Ok(p),
        None => Err(format!(
            "cannot find the buildlockd binary ({}); install it (`cargo install --path .`) or set BUILDLOCKD to its path",
            bin.display()
        )),
    }
}

/// Writes `content` to `path` unless it is already there; says which.
fn write_file(path: &Path, content: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        println!("{} is up to date", path.display());
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, content).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn remove_file(path: &Path) -> Result<bool, String> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            println!("removed {}", path.display());
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

/// The service manager's command-line tool, if it should be called: `env` overrides it, and
/// `none` means never.
fn tool(env: &str, default: &str) -> Option<String> {
    match std::env::var(env) {
        Ok(v) if v == "none" || v.is_empty() => None,
        Ok(v) => Some(v),
        Err(_) => Some(default.to_owned()),
    }
}

/// Runs `tool args`, echoing it; `Err` with its output when it fails.
fn call(tool: &str, args: &[&str]) -> Result<(), String> {
    println!("running: {tool} {}", args.join(" "));
    let out = Command::new(tool).args(args).output().map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{tool} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn systemd_unit_dir() -> Result<PathBuf, String> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or("neither XDG_CONFIG_HOME nor HOME is set; cannot tell where systemd user units go")?;
    Ok(config.join("systemd/user"))
}

/// `systemctl`, if the user's systemd manager answers.
fn systemctl() -> Option<String> {
    let tool = tool("BUILDLOCK_SYSTEMCTL", "systemctl")?;
    let ok = Command::new(&tool).args(["--user", "show-environment"]).output().is_ok_and(|o| o.status.success());
    ok.then_some(tool)
}

/// A daemon started on demand holds the socket path; stop it so the manager can take over.
fn stop_autostarted(cx: &Context) {
    use buildlock_proto::{Reply, Request};
    if let Ok(Reply::DaemonStatus(info)) = buildlock::ask_daemon(Some(&cx.runtime_dir), &Request::DaemonStatus) {
        if buildlock::ask_daemon(Some(&cx.runtime_dir), &Request::Shutdown).is_ok() {
            let _ = buildlock_sys::ipc::wait_exit(info.pid, Some(std::time::Duration::from_secs(30)));
            println!("stopped the running buildlockd (pid {}) so that the service manager owns its socket", info.pid);
        }
    }
}

fn install_systemd(cx: &Context, bin: &Path) -> Result<(), String> {
    let dir = systemd_unit_dir()?;
    let bin = bin.to_str().ok_or("the buildlockd path is not valid UTF-8")?;
    write_file(&dir.join("buildlockd.socket"), SOCKET_UNIT)?;
    write_file(&dir.join("buildlockd.service"), &SERVICE_UNIT.replace("%h/.cargo/bin/buildlockd", bin))?;
    match systemctl() {
        Some(tool) => {
            stop_autostarted(cx);
            call(&tool, &["--user", "daemon-reload"])?;
            call(&tool, &["--user", "enable", "--now", "buildlockd.socket"])?;
            println!("systemd now starts buildlockd on the first connection to its socket");
        }
        None => {
            println!("systemd's user manager is not reachable here; to finish, run:");
            println!("  buildlock-client daemon stop");
            println!("  systemctl --user daemon-reload");
            println!("  systemctl --user enable --now buildlockd.socket");
        }
    }
    Ok(())
}

fn uninstall_systemd(cx: &Context) -> Result<(), String> {
    let dir = systemd_unit_dir()?;
    let manager = systemctl();
    if let Some(tool) = &manager {
        // Not installed or already stopped: nothing to report.
        let _ = call(tool, &["--user", "disable", "--now", "buildlockd.socket", "buildlockd.service"]);
    }
    let a = remove_file(&dir.join("buildlockd.socket"))?;
    let b = remove_file(&dir.join("buildlockd.service"))?;
    let c = remove_file(&cx.runtime_dir.join(buildlock_proto::transport::MANAGED_MARKER))?;
    if let Some(tool) = &manager {
        call(tool, &["--user", "daemon-reload"])?;
    } else if a || b {
        println!("systemd's user manager is not reachable here; if it runs elsewhere, run:");
        println!("  systemctl --user disable --now buildlockd.socket buildlockd.service");
        println!("  systemctl --user daemon-reload");
    }
    if !(a || b || c) {
        println!("nothing to uninstall: no buildlockd units in {}", dir.display());
    }
    Ok(())
}

fn plist_path() -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").ok_or("HOME is not set; cannot tell where LaunchAgents go")?;
    Ok(PathBuf::from(home).join("Library/LaunchAgents").join(format!("{LABEL}.plist")))
}

fn launchctl() -> Option<String> {
    let tool = tool("BUILDLOCK_LAUNCHCTL", "launchctl")?;
    (cfg!(target_os = "macos") || std::env::var_os("BUILDLOCK_LAUNCHCTL").is_some()).then_some(tool)
}

fn install_launchd(cx: &Context, bin: &Path) -> Result<(), String> {
    let path = plist_path()?;
    let rt = cx.runtime_dir.to_str().ok_or("the runtime directory is not valid UTF-8")?;
    let bin = bin.to_str().ok_or("the buildlockd path is not valid UTF-8")?;
    let content = PLIST.replace("@BUILDLOCKD@", &xml_escape(bin)).replace("@RUNTIME_DIR@", &xml_escape(rt));
    // launchd creates the socket but not its directory.
    buildlock_sys::ipc::ensure_private_dir(&cx.runtime_dir)?;
    write_file(&path, &content)?;
    let domain = format!("gui/{}", buildlock_sys::ipc::current_uid());
    let plist = path.to_str().ok_or("the plist path is not valid UTF-8")?;
    match launchctl() {
        Some(tool) => {
            stop_autostarted(cx);
            let _ = call(&tool, &["bootout", &format!("{domain}/{LABEL}")]);
            call(&tool, &["bootstrap", &domain, plist])?;
            println!("launchd now starts buildlockd on the first connection to its socket");
        }
        None => {
            println!("launchctl is not available here; on the Mac, run:");
            println!("  buildlock-client daemon stop");
            println!("  launchctl bootstrap {domain} {plist}");
        }
    }
    Ok(())
}

fn uninstall_launchd(cx: &Context) -> Result<(), String> {
    let path = plist_path()?;
    if let Some(tool) = launchctl() {
        let _ = call(&tool, &["bootout", &format!("gui/{}/{LABEL}", buildlock_sys::ipc::current_uid())]);
    }
    let a = remove_file(&path)?;
    let b = remove_file(&cx.runtime_dir.join(buildlock_proto::transport::MANAGED_MARKER))?;
    if !(a || b) {
        println!("nothing to uninstall: no {}", path.display());
    }
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
