//! The client trusts only its own daemon: a runtime directory that is not the user's own and
//! private (another user's, mode 777, a symlink), or a listener that runs as another user, gets
//! nothing — not a hello, not a lock name — and `run` falls back to the lock files with a
//! warning naming the path (daemon-only use fails with that message instead).

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use buildlock_proto::{Reply, Request, Welcome};

use crate::util::{Env, HANG};

/// The uid of `nobody`, the "other user" of these tests.
const OTHER_UID: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

/// A listener impersonating buildlockd at `socket`, as an attacker would run it: it answers a
/// hello with a valid `Welcome` and grants every `Acquire`, and records every frame it gets.
struct FakeDaemon {
    socket: PathBuf,
    frames: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FakeDaemon {
    /// Listens at `socket`; with `uid`, the listening socket is made by a thread running as
    /// that user, so peer credentials name that user (`SO_PEERCRED` records who called
    /// `listen`). Needs root for `uid`.
    fn start(socket: &Path, uid: Option<u32>) -> FakeDaemon {
        use nix::sys::socket::{
            bind, listen, socket as new_socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        use std::os::fd::AsRawFd;
        let frames = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let path = socket.to_owned();
        let (f, a, s) = (frames.clone(), accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let fd: OwnedFd = new_socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
            if let Some(uid) = uid {
                // SAFETY: a plain system call with integer arguments. Called directly (not
                // through libc's setresuid, which changes every thread of the process), it
                // changes the effective uid of this thread only, so the test process itself
                // keeps its own identity.
                let rc = unsafe {
                    nix::libc::syscall(
                        nix::libc::SYS_setresuid,
                        -1 as nix::libc::c_long,
                        uid as nix::libc::c_long,
                        -1 as nix::libc::c_long,
                    )
                };
                assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
            }
            listen(&fd, Backlog::new(16).unwrap()).unwrap();
            let listener = UnixListener::from(fd);
            ready_tx.send(()).unwrap();
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                serve_fake(conn, &f);
            }
        });
        ready.recv_timeout(HANG).expect("fake daemon listening");
        FakeDaemon { socket: socket.to_owned(), frames, accepted, stop }
    }

    /// What the fake was sent, one entry per frame.
    fn frames(&self) -> Vec<String> {
        self.frames.lock().unwrap().clone()
    }
}

fn serve_fake(mut conn: UnixStream, frames: &Mutex<Vec<String>>) {
    conn.set_read_timeout(Some(HANG)).unwrap();
    let mut said_hello = false;
    while let Ok(Some(frame)) = buildlock_proto::read_frame(&mut conn) {
        if !said_hello {
            said_hello = true;
            frames.lock().unwrap().push("Hello".into());
            let _ = std::io::Write::write_all(&mut conn, &buildlock_proto::encode(&Welcome::new(1)).unwrap());
            continue;
        }
        let Ok(req) = buildlock_proto::decode::<Request>(&frame) else { return };
        frames.lock().unwrap().push(format!("{req:?}"));
        let reply = match req {
            Request::Acquire(a) => {
                Reply::Granted { lease: a.lease, path: a.path, token: 1, fd_attached: false, file: None }
            }
            Request::Release { lease, .. } => Reply::Released { lease, path: String::new() },
            _ => continue,
        };
        let _ = std::io::Write::write_all(&mut conn, &buildlock_proto::encode(&reply).unwrap());
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        // Wake the accept loop so that its thread ends.
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
    }
}

/// What every case must show: `run` in the default (auto) mode runs CMD on the lock files, after
/// a warning naming the runtime directory and `why`; daemon-only use (the library's
/// `Connect::DaemonOnly`, the CLI's `daemon start`) fails with that message; `status` and
/// `daemon stop` do not talk to it either; the fake daemon got nothing.
#[track_caller]
fn assert_untrusted(env: &Env, fake: &FakeDaemon, named: &Path, why: &str) {
    let named = named.display().to_string();
    let out = env.run(&["run", "x", "--", "sh", "-c", &format!("cat {}", env.locks().join("x.lock.pid").display())]);
    out.assert_code(0)
        .assert_stderr_has("using the lock files directly")
        .assert_stderr_has(&named)
        .assert_stderr_has(why);
    // The metadata CMD saw was written by the client itself, on the files (a daemon writes its
    // own "via" record; the fake writes none).
    let meta: serde_json::Value = serde_json::from_str(&out.stdout).expect("CMD ran with metadata on disk");
    assert!(meta["pid"].as_u64().is_some(), "{meta}");

    let target = buildlock::LockTarget::resolve("y", &env.locks()).unwrap();
    let opts = buildlock::Options {
        connect: buildlock::Connect::DaemonOnly,
        runtime_dir: Some(env.runtime()),
        operation: "trust test".into(),
        ..buildlock::Options::default()
    };
    match buildlock::acquire(&target, &opts, &mut |_| {}) {
        Ok(lease) => panic!("daemon-only acquire succeeded through {named} (token {})", lease.token()),
        Err(buildlock::Error::NoDaemon(msg)) => {
            assert!(msg.contains(&named) && msg.contains(why), "daemon-only error lacks {named:?} / {why:?}: {msg}")
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    env.run(&["daemon", "start"]).assert_code(2).assert_stderr_has(&named).assert_stderr_has(why);
    env.run(&["status", "x"]).assert_code(0);
    env.run(&["daemon", "stop"]);
    assert_eq!(fake.frames(), Vec::<String>::new(), "the impostor was sent something");
}

/// A daemon environment whose runtime directory the test makes itself.
fn env_with_runtime(mode: u32, owner: Option<u32>) -> Env {
    let env = Env::daemon();
    std::fs::create_dir(env.runtime()).unwrap();
    std::fs::set_permissions(env.runtime(), std::fs::Permissions::from_mode(mode)).unwrap();
    if let Some(uid) = owner {
        std::os::unix::fs::chown(env.runtime(), Some(uid), Some(uid)).unwrap();
    }
    env
}

#[test]
fn a_runtime_dir_of_another_user_with_an_impostor_in_it_is_not_used() {
    if !is_root() {
        eprintln!("skipped: needs root to make a directory of another user");
        return;
    }
    // Another user got to /tmp/buildlock-<uid> first, and listens in it.
    let env = env_with_runtime(0o777, Some(OTHER_UID));
    let fake = FakeDaemon::start(&env.runtime().join("buildlockd.sock"), Some(OTHER_UID));
    assert_untrusted(&env, &fake, &env.runtime(), &format!("belongs to uid {OTHER_UID}"));
    // Autostart neither took the directory over nor started a daemon in it.
    let m = std::fs::metadata(env.runtime()).unwrap();
    assert_eq!((std::os::unix::fs::MetadataExt::uid(&m), m.permissions().mode() & 0o777), (OTHER_UID, 0o777));
    assert!(!env.runtime().join("buildlockd.pid").exists(), "a daemon was started in it");
}

#[test]
fn a_private_runtime_dir_of_another_user_is_not_used() {
    if !is_root() {
        eprintln!("skipped: needs root to make a directory of another user");
        return;
    }
    let env = env_with_runtime(0o700, Some(OTHER_UID));
    let fake = FakeDaemon::start(&env.runtime().join("buildlockd.sock"), Some(OTHER_UID));
    assert_untrusted(&env, &fake, &env.runtime(), &format!("belongs to uid {OTHER_UID}"));
}

#[test]
fn a_world_writable_runtime_dir_is_not_used_even_with_a_listener_of_ours() {
    // The listener runs as this user, so only the directory check can tell: anyone could have
    // put a socket there.
    let env = env_with_runtime(0o777, None);
    let fake = FakeDaemon::start(&env.runtime().join("buildlockd.sock"), None);
    assert_untrusted(&env, &fake, &env.runtime(), "mode 777");
    assert!(!env.runtime().join("buildlockd.pid").exists(), "a daemon was started in it");
    // A directory others may only read is refused too (they could watch the socket appear).
    std::fs::set_permissions(env.runtime(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_untrusted(&env, &fake, &env.runtime(), "mode 755");
}

#[test]
fn a_symlinked_runtime_dir_is_not_used() {
    let env = Env::daemon();
    // The link points at a private directory of ours with a listener: still refused, since
    // whoever made the link chose where it points.
    let real = env.path("real-rt");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&real, env.runtime()).unwrap();
    let fake = FakeDaemon::start(&real.join("buildlockd.sock"), None);
    assert_untrusted(&env, &fake, &env.runtime(), "symbolic link");
    assert!(!real.join("buildlockd.pid").exists(), "a daemon was started behind the link");
    assert!(std::fs::symlink_metadata(env.runtime()).unwrap().file_type().is_symlink());
}

#[test]
fn a_listener_of_another_user_in_a_private_runtime_dir_gets_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root to listen as another user");
        return;
    }
    // The directory is ours and private (made before the check, say), but the process on the
    // socket runs as another user: only the peer-credential check can tell.
    let env = env_with_runtime(0o700, None);
    let socket = env.runtime().join("buildlockd.sock");
    let fake = FakeDaemon::start(&socket, Some(OTHER_UID));
    assert_untrusted(&env, &fake, &socket, &format!("runs as uid {OTHER_UID}"));
    assert!(fake.accepted.load(Ordering::SeqCst) > 0, "the client never connected: the peer check was not exercised");
}
