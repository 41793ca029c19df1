//! `status` and `break`: what they print, for people and (with `--json`) for scripts.

use std::process::ExitCode;

use buildlock_disk::{Broken, Error, Holder, LockStatus};
use buildlock_proto::{LockInfo, Reply, Request};
use serde_json::{json, Value};

use crate::{fail, Context};

pub(crate) fn status(cx: &Context, target: Option<&str>) -> ExitCode {
    if let Some(code) = remote_status(cx, target) {
        return code;
    }
    let targets = match target {
        Some(t) => match cx.target(t) {
            Ok(t) => vec![t],
            Err(e) => return fail(&e),
        },
        None => match buildlock_disk::list(&cx.dir) {
            Ok(ts) => ts,
            Err(e) => return fail(&e),
        },
    };
    let mut statuses = Vec::new();
    let mut failed = false;
    for t in &targets {
        match buildlock_disk::status(t, &cx.opts) {
            Ok(s) => statuses.push((s, daemon_view(cx, t))),
            // One lock: its error is the answer.
            Err(e) if target.is_some() => return fail(&e),
            // Listing them all: one file that is not a lock (or unreadable) hides no other.
            Err(e) => {
                eprintln!("buildlock-client: error: {e}");
                failed = true;
            }
        }
    }
    if cx.json {
        let list: Vec<Value> = statuses
            .iter()
            .map(|(s, d)| {
                let mut v = status_json(s);
                if let Some(d) = d {
                    v["daemon"] = daemon_json(d);
                }
                v
            })
            .collect();
        let out = match target {
            Some(_) => list.into_iter().next().unwrap_or(Value::Null),
            None => json!({ "dir": cx.dir, "locks": list }),
        };
        println!("{out}");
    } else if statuses.is_empty() {
        println!("no locks in {}", cx.dir.display());
    } else {
        for (s, d) in &statuses {
            print_status(s);
            if let Some(d) = d {
                for h in d.holders.iter().filter(|h| h.token.is_some()) {
                    let held = h.since_unix_ms.map(|t| format!(", held for {}", crate::history::held_for(t)));
                    let max_hold = h
                        .max_hold_ms
                        .map(|ms| {
                            format!(", max-hold {}", buildlock_disk::stale::secs(std::time::Duration::from_millis(ms)))
                        })
                        .unwrap_or_default();
                    println!(
                        "  daemon lease: {} (token {}{}{max_hold})",
                        h.description,
                        h.token.unwrap_or(0),
                        held.unwrap_or_default()
                    );
                }
                for w in &d.waiters {
                    let op =
                        if w.operation.is_empty() { String::new() } else { format!(", operation '{}'", w.operation) };
                    println!("  waiting: pid {}, {}, for {}ms{op}", w.pid, w.mode, w.waited_ms);
                }
            }
        }
    }
    if failed {
        ExitCode::from(crate::EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// What the daemon knows of `target` (its leases and waiters), if a daemon is running.
/// Never starts one.
fn daemon_view(cx: &Context, target: &buildlock_disk::LockTarget) -> Option<LockInfo> {
    if cx.connect == buildlock::Connect::Direct {
        return None;
    }
    let path = buildlock::daemon_key(target)?.display().to_string();
    match buildlock::ask_daemon(Some(&cx.runtime_dir), &Request::Status { path: Some(path) }) {
        Ok(Reply::Status { locks }) => locks.into_iter().next(),
        _ => None,
    }
}

fn daemon_json(d: &LockInfo) -> Value {
    json!({
        "holders": d.holders.iter().map(|h| json!({
            "pid": h.pid, "command": h.command, "mode": h.mode.map(|m| m.to_string()), "token": h.token,
            "since_unix_ms": h.since_unix_ms, "operation": h.operation, "outside": h.outside,
            "description": h.description, "max_hold_ms": h.max_hold_ms,
        })).collect::<Vec<_>>(),
        "waiters": d.waiters.iter().map(|w| json!({
            "pid": w.pid, "mode": w.mode.to_string(), "waited_ms": w.waited_ms, "operation": w.operation,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(s: &LockStatus) {
    let mode = s.holder.as_ref().and_then(|h| h.mode.or(h.meta.as_ref().and_then(|m| m.mode)));
    let mode = mode.map(|m| format!(", {}", m.as_str())).unwrap_or_default();
    println!("{} ({}): {} ({} lock{mode})", s.target.name, s.target.path.display(), s.state.as_str(), s.kind);
    if let Some(h) = &s.holder {
        println!("  holder: {h}");
        if let Some(since) = h.since() {
            println!("  held for {}", crate::history::held_for(since.as_millisecond()));
        }
    }
    println!("  {}", s.detail);
    if let Some(lost) = &s.lost {
        println!("  LOST: {lost}");
    }
}

fn status_json(s: &LockStatus) -> Value {
    json!({
        "name": s.target.name,
        "path": s.target.path,
        "state": s.state.as_str(),
        "kind": s.kind,
        "detail": s.detail,
        "holder": s.holder.as_ref().map(holder_json),
        "lost": s.lost.as_ref().map(|l| json!({
            "pid": l.pid,
            "command": l.command,
            "operation": l.operation,
            "at": l.at.to_string(),
            "reason": l.reason,
            "description": l.to_string(),
        })),
    })
}

fn holder_json(h: &Holder) -> Value {
    let m = h.meta.as_ref();
    json!({
        "pid": h.pid(),
        "command": h.command,
        "host": m.map(|m| &m.hostname),
        "mode": h.mode.or(m.and_then(|m| m.mode)).map(|m| m.as_str()),
        "since": h.since().map(|t| t.to_string()),
        "held_ms": h.since().map(|t| buildlock_history::now_ms() - t.as_millisecond()),
        "operation": m.map(|m| &m.operation),
        "note": h.note,
        "via_pid": m.and_then(|m| m.via_pid),
        "orphaned_by": h.orphaned_by,
        "inheritors": h.inheritors,
        "description": h.to_string(),
    })
}

pub(crate) fn break_lock(cx: &Context, target: &str, force: bool) -> ExitCode {
    let target = match cx.target(target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    // A stale lock recovered on the way is recorded too (with the break, once it is done).
    buildlock::history::install_hook();
    let (result, detail, code) = match buildlock_disk::break_lock(&target, &cx.opts, force) {
        Ok(Broken::NotHeld { cleaned }) => {
            let detail = match cleaned {
                Some(c) => format!("lock {} is not held; {c}", target.name),
                None => format!("lock {} is not held; nothing to do", target.name),
            };
            ("not-held", detail, ExitCode::SUCCESS)
        }
        Ok(Broken::Broken { reason }) => {
            buildlock::history::broken(&target, &reason);
            ("broken", format!("removed stale lock {} ({reason})", target.path.display()), ExitCode::SUCCESS)
        }
        Err(e @ Error::Refused { .. }) => ("refused", e.to_string(), ExitCode::from(1)),
        Err(e) => return fail(&e),
    };
    buildlock::history::flush();
    if cx.json {
        println!("{}", json!({ "name": target.name, "path": target.path, "result": result, "detail": detail }));
    } else if result == "refused" {
        eprintln!("buildlock-client: {detail}");
    } else {
        println!("{detail}");
    }
    code
}

/// `status` of remote locks: a lock routed to a server (TARGET), every lock on `--backend`'s
/// server, or, with no `--backend`, the servers of the config file before the local locks.
/// `None` when the local locks are to be listed (too).
fn remote_status(cx: &Context, target: Option<&str>) -> Option<ExitCode> {
    let name = match target.map(|t| cx.target(t)).transpose() {
        Ok(t) => t.map(|t| t.name),
        Err(e) => return Some(fail(&e)),
    };
    let (urls, only_remote) = cx.config.status_servers(name.as_deref(), cx.backend.as_deref());
    if name.is_some() && urls.is_empty() {
        return None;
    }
    let mut failed = false;
    for url in urls {
        let settings = match buildlock_remote::from_url(url).and_then(|s| s.with_remote_timeout(cx.remote_timeout)) {
            Ok(s) => s,
            Err(e) => return Some(fail(&e)),
        };
        let server = settings.display();
        let entries = match buildlock_remote::status(&*settings, name.as_deref()) {
            Ok(e) => e,
            Err(e) if only_remote => return Some(fail(&e)),
            Err(e) => {
                eprintln!("buildlock-client: error: {e}");
                failed = true;
                continue;
            }
        };
        if cx.json {
            let list: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let h = &e.holder;
                    json!({
                        "name": e.name, "state": if e.granted { "held" } else { "waiting" },
                        "mode": if h.mode == buildlock_remote::Mode::Shared { "shared" } else { "exclusive" },
                        "host": h.host, "pid": h.pid, "command": h.command, "operation": h.operation,
                        "since": h.since, "seconds": h.held_secs, "token": h.token, "server_pid": h.backend_pid,
                    })
                })
                .collect();
            println!("{}", json!({ "backend": server, "locks": list }));
            continue;
        }
        if entries.is_empty() {
            match &name {
                Some(n) => println!("lock {n} on {server}: free"),
                None => println!("no locks held or waited for on {server}"),
            }
        }
        let mut last: Option<&str> = None;
        for e in &entries {
            if last != Some(e.name.as_str()) {
                println!("lock {} on {server}:", e.name);
                last = Some(&e.name);
            }
            let state = if e.granted { "held by" } else { "waiting:" };
            println!("  {state} {}", e.holder.describe());
        }
    }
    if only_remote || failed {
        return Some(ExitCode::from(if failed { crate::EXIT_USAGE } else { 0 }));
    }
    None
}
