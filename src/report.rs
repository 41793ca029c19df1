//! `status` and `break`: what they print, for people and (with `--json`) for scripts.

use std::process::ExitCode;

use buildlock_disk::{Broken, Error, Holder, LockStatus};
use serde_json::{json, Value};

use crate::{fail, Context};

pub(crate) fn status(cx: &Context, target: Option<&str>) -> ExitCode {
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
    for t in &targets {
        match buildlock_disk::status(t, &cx.opts) {
            Ok(s) => statuses.push(s),
            Err(e) => return fail(&e),
        }
    }
    if cx.json {
        let list: Vec<Value> = statuses.iter().map(status_json).collect();
        let out = match target {
            Some(_) => list.into_iter().next().unwrap_or(Value::Null),
            None => json!({ "dir": cx.dir, "locks": list }),
        };
        println!("{out}");
    } else if statuses.is_empty() {
        println!("no locks in {}", cx.dir.display());
    } else {
        for s in &statuses {
            print_status(s);
        }
    }
    ExitCode::SUCCESS
}

fn print_status(s: &LockStatus) {
    let mode = s.holder.as_ref().and_then(|h| h.mode.or(h.meta.as_ref().and_then(|m| m.mode)));
    let mode = mode.map(|m| format!(", {}", m.as_str())).unwrap_or_default();
    println!("{} ({}): {} ({} lock{mode})", s.target.name, s.target.path.display(), s.state.as_str(), s.kind);
    if let Some(h) = &s.holder {
        println!("  holder: {h}");
    }
    println!("  {}", s.detail);
}

fn status_json(s: &LockStatus) -> Value {
    json!({
        "name": s.target.name,
        "path": s.target.path,
        "state": s.state.as_str(),
        "kind": s.kind,
        "detail": s.detail,
        "holder": s.holder.as_ref().map(holder_json),
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
        "operation": m.map(|m| &m.operation),
        "note": h.note,
        "description": h.to_string(),
    })
}

pub(crate) fn break_lock(cx: &Context, target: &str, force: bool) -> ExitCode {
    let target = match cx.target(target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let (result, detail, code) = match buildlock_disk::break_lock(&target, &cx.opts, force) {
        Ok(Broken::NotHeld { cleaned }) => {
            let detail = match cleaned {
                Some(c) => format!("lock {} is not held; {c}", target.name),
                None => format!("lock {} is not held; nothing to do", target.name),
            };
            ("not-held", detail, ExitCode::SUCCESS)
        }
        Ok(Broken::Broken { reason }) => {
            ("broken", format!("removed stale lock {} ({reason})", target.path.display()), ExitCode::SUCCESS)
        }
        Err(e @ Error::Refused { .. }) => ("refused", e.to_string(), ExitCode::from(1)),
        Err(e) => return fail(&e),
    };
    if cx.json {
        println!("{}", json!({ "name": target.name, "path": target.path, "result": result, "detail": detail }));
    } else if result == "refused" {
        eprintln!("buildlock-client: {detail}");
    } else {
        println!("{detail}");
    }
    code
}
