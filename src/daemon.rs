//! `daemon start|stop|status` (and `install|uninstall`, in `service.rs`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use buildlock_proto::{Reply, Request};
use serde_json::json;

use crate::{fail, Context, DaemonAction};

pub(crate) fn daemon(cx: &Context, action: DaemonAction) -> ExitCode {
    let rt = Some(cx.runtime_dir.as_path());
    match action {
        DaemonAction::Install(m) => crate::service::install(cx, crate::service::Manager::pick(m.systemd, m.launchd)),
        DaemonAction::Uninstall(m) => {
            crate::service::uninstall(cx, crate::service::Manager::pick(m.systemd, m.launchd))
        }
        DaemonAction::Start => match buildlock::start_daemon(rt) {
            Ok(pid) => {
                println!("buildlockd is running (pid {pid}, runtime directory {})", cx.runtime_dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        DaemonAction::Stop => {
            let pid = match buildlock::ask_daemon(rt, &Request::DaemonStatus) {
                Ok(Reply::DaemonStatus(info)) => info.pid,
                Ok(other) => return fail(&format!("unexpected reply from buildlockd: {other:?}")),
                Err(buildlock::Error::NoDaemon(why)) => {
                    // Nothing answered; but a daemon holding the instance lock is alive all the
                    // same (stopped, or stuck), and saying "not running" would be a lie.
                    if let Some(pid) = unresponsive_daemon(&cx.runtime_dir) {
                        return fail(&format!(
                            "buildlockd (pid {pid}) is running for {} but does not answer ({why}); it may be \
                             stopped (SIGSTOP) or hung: resume it with `kill -CONT {pid}`, or end it with \
                             `kill -9 {pid}` (its holders keep their locks)",
                            cx.runtime_dir.display()
                        ));
                    }
                    println!("no buildlockd is running for {}", cx.runtime_dir.display());
                    return ExitCode::SUCCESS;
                }
                Err(e) => return fail(&e),
            };
            if let Err(e) = buildlock::ask_daemon(rt, &Request::Shutdown) {
                return fail(&e);
            }
            match buildlock_sys::ipc::wait_exit(pid, Some(STOP_TIMEOUT)) {
                Ok(true) => {
                    println!("stopped buildlockd (pid {pid})");
                    ExitCode::SUCCESS
                }
                Ok(false) => fail(&format!(
                    "asked buildlockd (pid {pid}) to stop, but it is still running after {} s; it may be stopped \
                     (SIGSTOP) or stuck: end it with `kill -9 {pid}` (its holders keep their locks)",
                    STOP_TIMEOUT.as_secs()
                )),
                Err(e) => fail(&format!("asked buildlockd (pid {pid}) to stop, but cannot tell whether it did: {e}")),
            }
        }
        DaemonAction::Status => match buildlock::ask_daemon(rt, &Request::DaemonStatus) {
            Ok(Reply::DaemonStatus(i)) => {
                let remote = remote_locks(rt);
                if cx.json {
                    println!(
                        "{}",
                        json!({
                            "running": true, "pid": i.pid, "protocol": i.version, "build": i.build,
                            "started_unix_ms": i.started_unix_ms, "runtime_dir": i.runtime_dir, "socket": i.socket,
                            "connections": i.connections, "leases": i.leases, "waiters": i.waiters,
                            "idle_exit_ms": i.idle_exit_ms,
                            "remote": remote.iter().map(|l| json!({
                                "lock": l.path,
                                "holders": l.holders.iter().map(|h| h.description.clone()).collect::<Vec<_>>(),
                                "waiters": l.waiters.iter().map(|w| w.pid).collect::<Vec<_>>(),
                            })).collect::<Vec<_>>(),
                        })
                    );
                } else {
                    println!("buildlockd {} (protocol {}) is running, pid {}", i.build, i.version, i.pid);
                    println!("  socket: {}", i.socket);
                    println!("  connections: {}, leases: {}, waiters: {}", i.connections, i.leases, i.waiters);
                    for l in &remote {
                        println!("  remote lock {}:", l.path);
                        for h in &l.holders {
                            println!("    held by {}", h.description);
                        }
                        for w in &l.waiters {
                            println!("    waiting: pid {} ({}, {}s)", w.pid, w.mode, w.waited_ms / 1000);
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Ok(other) => fail(&format!("unexpected reply from buildlockd: {other:?}")),
            Err(buildlock::Error::NoDaemon(why)) => {
                if cx.json {
                    println!("{}", json!({ "running": false, "runtime_dir": cx.runtime_dir, "why": why }));
                } else {
                    println!("no buildlockd is running for {} ({why})", cx.runtime_dir.display());
                }
                ExitCode::from(1)
            }
            Err(e) => fail(&e),
        },
    }
}

/// The remote locks the daemon holds server sessions for (their `path` reads `NAME on
/// postgres://host:port/db`, never a password), with holders and waiters.
fn remote_locks(rt: Option<&Path>) -> Vec<buildlock_proto::LockInfo> {
    match buildlock::ask_daemon(rt, &Request::Status { path: None }) {
        Ok(Reply::Status { locks }) => locks.into_iter().filter(|l| !Path::new(&l.path).is_absolute()).collect(),
        _ => Vec::new(),
    }
}

/// How long `daemon stop` waits for the daemon to exit; it promises to within 2 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The pid of a daemon that holds `runtime_dir`'s instance lock (so is alive), from its pid file.
fn unresponsive_daemon(runtime_dir: &Path) -> Option<u32> {
    let lock = buildlock_sys::LockFile::open_existing(&runtime_dir.join("buildlockd.lock")).ok()?;
    match lock.probe() {
        Ok(buildlock_sys::Probe::Held { .. }) => {
            std::fs::read_to_string(runtime_dir.join("buildlockd.pid")).ok()?.trim().parse().ok()
        }
        _ => None,
    }
}
