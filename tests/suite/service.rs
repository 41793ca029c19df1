//! Service managers: the systemd units (verified by the real `systemd-analyze`), socket
//! activation through the real `systemd-socket-activate`, the launchd plist, install/uninstall.

use std::process::Command;

use crate::util::{output_bounded, wait_dead, Env, Proc};

fn unit_dir(env: &Env) -> std::path::PathBuf {
    env.path("home/.config/systemd/user")
}

/// `daemon ACTION` with the service manager's tool switched off (or set to `tool`).
fn manage(env: &Env, args: &[&str], tool: &str) -> crate::util::Out {
    let mut c = env.cli();
    c.args(args).env("BUILDLOCK_SYSTEMCTL", tool).env("BUILDLOCK_LAUNCHCTL", tool);
    output_bounded(c, &format!("buildlock-client {}", args.join(" ")))
}

/// Runs `systemd-analyze --user verify` on `files`; returns everything it printed.
fn verify(env: &Env, files: &[std::path::PathBuf]) -> (bool, String) {
    let rt = env.path("systemd-rt");
    std::fs::create_dir_all(&rt).unwrap();
    let mut c = Command::new("systemd-analyze");
    c.args(["--user", "verify"]).args(files).env("XDG_RUNTIME_DIR", &rt).env("HOME", env.path("home"));
    let out = output_bounded(c, "systemd-analyze (Debian package systemd)");
    (out.status.success(), format!("{}{}", out.stdout, out.stderr))
}

#[test]
fn installed_systemd_units_verify_without_warnings() {
    let env = Env::daemon();
    manage(&env, &["daemon", "install", "--systemd"], "none")
        .assert_code(0)
        .assert_stdout_has("wrote")
        .assert_stdout_has("systemctl --user enable --now buildlockd.socket");
    let files = [unit_dir(&env).join("buildlockd.socket"), unit_dir(&env).join("buildlockd.service")];
    let service = std::fs::read_to_string(&files[1]).unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_buildlockd")).canonicalize().unwrap();
    assert!(service.contains(&format!("ExecStart={} --runtime-dir %t/buildlock", bin.display())), "{service}");
    let (ok, text) = verify(&env, &files);
    assert!(ok && text.trim().is_empty(), "systemd-analyze complained:\n{text}");
    // The check can fail: an unknown key is reported (while the exit code stays 0).
    std::fs::write(&files[1], service.replace("Restart=on-failure", "Restart=on-failure\nRestartt=always")).unwrap();
    let (_, text) = verify(&env, &files);
    assert!(text.contains("Unknown key"), "{text}");
}

#[test]
fn socket_activation_through_systemd_socket_activate() {
    let env = Env::daemon();
    let rt = env.runtime();
    std::fs::create_dir(&rt).unwrap();
    std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let socket = rt.join("buildlockd.sock");
    // Stand in for systemd's notification socket, to hear READY=1.
    let notify_path = env.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(crate::util::HANG)).unwrap();
    let mut c = Command::new("systemd-socket-activate");
    c.arg("-l").arg(&socket).arg("-E").arg(format!("NOTIFY_SOCKET={}", notify_path.display()));
    c.arg(env!("CARGO_BIN_EXE_buildlockd")).arg("--runtime-dir").arg(&rt);
    let mut activator = Proc::spawn(c);
    activator.expect_stderr("Listening on");
    // The first connection starts the daemon, which takes over the socket it is given.
    env.run(&["run", "x", "--", "echo", "held"]).assert_code(0).assert_stdout_has("held");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("the daemon told systemd it is ready");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    let v: serde_json::Value = serde_json::from_str(&env.run(&["daemon", "status", "--json"]).stdout).unwrap();
    assert_eq!(v["pid"], activator.pid(), "the client reached a daemon other than the activated one");
    assert_eq!(std::fs::read_to_string(rt.join("buildlockd.managed")).unwrap().trim(), "systemd");
    // Stopping it leaves the socket it was given in place.
    env.run(&["daemon", "stop"]).assert_code(0);
    wait_dead(activator.pid());
    assert!(socket.exists(), "the daemon removed the socket systemd gave it");
    // With the manager's socket dead, clients do not start a daemon of their own.
    env.run(&["run", "x", "--", "echo", "direct"])
        .assert_code(0)
        .assert_stdout_has("direct")
        .assert_stderr_has("managed by systemd")
        .assert_stderr_has("systemctl --user start buildlockd.socket");
    assert_eq!(env.daemon_pid(), None, "a client started a second daemon");
}

#[test]
fn install_drives_systemctl_and_both_directions_are_idempotent() {
    let env = Env::daemon();
    let log = env.path("systemctl.log");
    let fake = env.path("systemctl");
    std::fs::write(&fake, format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display())).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fake = fake.to_str().unwrap();
    manage(&env, &["daemon", "install"], fake).assert_code(0).assert_stdout_has("wrote");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.contains("--user daemon-reload\n--user enable --now buildlockd.socket"), "{calls}");
    manage(&env, &["daemon", "install"], fake).assert_code(0).assert_stdout_has("is up to date");
    manage(&env, &["daemon", "uninstall"], fake).assert_code(0).assert_stdout_has("removed");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("--user disable --now buildlockd.socket buildlockd.service"));
    assert!(!unit_dir(&env).join("buildlockd.socket").exists());
    manage(&env, &["daemon", "uninstall"], fake).assert_code(0).assert_stdout_has("nothing to uninstall");
}

#[test]
fn launchd_plist_has_the_keys_launchd_needs() {
    let env = Env::daemon();
    // No launchctl here: the plist is written and the command to load it printed.
    let mut c = env.cli();
    c.args(["daemon", "install", "--launchd"]);
    let out = output_bounded(c, "daemon install --launchd");
    out.assert_code(0).assert_stdout_has("launchctl bootstrap gui/");
    let plist = env.path("home/Library/LaunchAgents/dev.buildlock.buildlockd.plist");
    let script = "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))";
    let parsed = env.fasteners(&[]).get_program().to_owned();
    let mut c = Command::new(parsed);
    c.args(["-c", script]).arg(&plist);
    let parsed = output_bounded(c, "python reading the plist");
    assert!(parsed.status.success(), "{}", parsed.stderr);
    let v: serde_json::Value = serde_json::from_str(&parsed.stdout).unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_buildlockd")).canonicalize().unwrap();
    let rt = env.runtime();
    assert_eq!(v["Label"], "dev.buildlock.buildlockd");
    assert_eq!(v["ProgramArguments"], serde_json::json!([bin, "--runtime-dir", rt]));
    assert_eq!(v["Sockets"]["Listeners"]["SockPathName"], rt.join("buildlockd.sock").to_str().unwrap());
    assert_eq!(v["Sockets"]["Listeners"]["SockPathMode"], 0o600);
    assert_eq!(v["EnvironmentVariables"]["BUILDLOCKD_IDLE_EXIT"], "300");
    let mut c = env.cli();
    c.args(["daemon", "uninstall", "--launchd"]);
    let out = output_bounded(c, "daemon uninstall --launchd");
    out.assert_code(0).assert_stdout_has("removed");
    assert!(!plist.exists());
}
