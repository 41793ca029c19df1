//! `daemon start|stop|status` (and `install|uninstall`, in `service.rs`).

use std::process::ExitCode;

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
                Err(buildlock::Error::NoDaemon(_)) => {
                    println!("no buildlockd is running for {}", cx.runtime_dir.display());
                    return ExitCode::SUCCESS;
                }
                Err(e) => return fail(&e),
            };
            if let Err(e) = buildlock::ask_daemon(rt, &Request::Shutdown) {
                return fail(&e);
            }
            let _ = buildlock_sys::ipc::wait_exit(pid, Some(std::time::Duration::from_secs(30)));
            println!("stopped buildlockd (pid {pid})");
            ExitCode::SUCCESS
        }
        DaemonAction::Status => match buildlock::ask_daemon(rt, &Request::DaemonStatus) {
            Ok(Reply::DaemonStatus(i)) => {
                if cx.json {
                    println!(
                        "{}",
                        json!({
                            "running": true, "pid": i.pid, "protocol": i.version, "build": i.build,
                            "started_unix_ms": i.started_unix_ms, "runtime_dir": i.runtime_dir, "socket": i.socket,
                            "connections": i.connections, "leases": i.leases, "waiters": i.waiters,
                            "idle_exit_ms": i.idle_exit_ms,
                        })
                    );
                } else {
                    println!("buildlockd {} (protocol {}) is running, pid {}", i.build, i.version, i.pid);
                    println!("  socket: {}", i.socket);
                    println!("  connections: {}, leases: {}, waiters: {}", i.connections, i.leases, i.waiters);
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
