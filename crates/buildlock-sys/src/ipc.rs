//! Unix sockets and daemons: passing a locked descriptor (SCM_RIGHTS), watching a process exit
//! (pidfd), private runtime directories, and detaching a spawned daemon.

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

#[cfg(target_os = "linux")]
const SEND_FLAGS: MsgFlags = MsgFlags::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: MsgFlags = MsgFlags::empty();

#[cfg(target_os = "linux")]
const RECV_FLAGS: MsgFlags = MsgFlags::MSG_CMSG_CLOEXEC;
#[cfg(not(target_os = "linux"))]
const RECV_FLAGS: MsgFlags = MsgFlags::empty();

/// Sends `data` on a Unix stream socket, with `fd` riding on its first byte (SCM_RIGHTS).
/// Returns how many bytes were sent; the caller sends the rest without the descriptor.
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let raw: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
    let cmsgs: &[ControlMessage] = match fd {
        Some(_) => &[ControlMessage::ScmRights(&raw)],
        None => &[],
    };
    Ok(sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, SEND_FLAGS, None)?)
}

/// Receives bytes from a Unix stream socket into `buf`, appending any descriptors that came with
/// them to `fds` (close-on-exec). `Ok(0)` is end of stream.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = loop {
        match recvmsg::<UnixAddr>(sock.as_raw_fd(), &mut iov, Some(&mut space), RECV_FLAGS) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for raw in received {
                // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                #[cfg(not(target_os = "linux"))]
                let _ = nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
                fds.push(owned);
            }
        }
    }
    Ok(msg.bytes)
}

/// This process's real user id.
pub fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The daemon's runtime directory: `$BUILDLOCK_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/buildlock`,
/// else `<temp dir>/buildlock-<uid>` (checked like any other by [`ensure_private_dir`]).
pub fn default_runtime_dir() -> std::path::PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    if let Some(d) = var("BUILDLOCK_RUNTIME_DIR") {
        return d;
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        return d.join("buildlock");
    }
    std::env::temp_dir().join(format!("buildlock-{}", current_uid()))
}

/// Creates `dir` (mode 0700) if missing, then checks it with [`check_private_dir`]. `Err` says
/// what is wrong and how to fix it. An existing directory is never loosened or taken over: one
/// that fails the check is refused as it is.
pub fn ensure_private_dir(dir: &Path) -> Result<(), String> {
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Err(e) = fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
                return Err(format!("cannot create {}: {e}", dir.display()));
            }
        }
        Err(e) => return Err(format!("cannot inspect {}: {e}", dir.display())),
    }
    check_private_dir(dir)
}

/// Checks, without following a symlink at `dir` itself, that it is a directory owned by this
/// user that nobody else can read, write or enter. Whoever controls the runtime directory can
/// put a listener at the daemon's socket path, so a client must not talk to a socket in any
/// other directory. `Err` names the path, what was found, and what to do.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    const FIX: &str = "have it removed, or set BUILDLOCK_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a directory of yours \
                       with mode 700";
    let m = fs::symlink_metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    let uid = current_uid();
    if m.file_type().is_symlink() {
        let to = fs::read_link(dir).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
        return Err(format!(
            "the runtime directory {} is a symbolic link (to {to}, link owned by uid {}), not a directory: \
             another user could have made it; {FIX}",
            dir.display(),
            m.uid()
        ));
    }
    if !m.is_dir() {
        return Err(format!("the runtime directory {} is not a directory; {FIX}", dir.display()));
    }
    let mode = m.permissions().mode() & 0o7777;
    if m.uid() != uid {
        return Err(format!(
            "the runtime directory {} belongs to uid {} (mode {mode:03o}), not to you (uid {uid}): another user \
             could be impersonating buildlockd; {FIX}",
            dir.display(),
            m.uid()
        ));
    }
    if mode & 0o077 != 0 {
        let who = if mode & 0o022 != 0 {
            "others can write it, so they could impersonate the daemon"
        } else {
            "others can read it"
        };
        return Err(format!(
            "the runtime directory {} has mode {mode:03o}: {who}; run `chmod 700 {}`",
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// The user id of the process at the other end of a connected Unix socket (for a client: the
/// process that made the listening socket listen). Linux: `SO_PEERCRED`; macOS and the BSDs:
/// `getpeereid`.
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let cred = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)?;
        Ok(cred.uid())
    }
    #[cfg(any(
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "openbsd",
        target_os = "netbsd",
        target_os = "dragonfly"
    ))]
    {
        let (uid, _gid) = nix::unistd::getpeereid(sock)?;
        Ok(uid.as_raw())
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "openbsd",
        target_os = "netbsd",
        target_os = "dragonfly"
    )))]
    {
        let _ = sock;
        Err(io::Error::new(io::ErrorKind::Unsupported, "peer credentials are not available on this platform"))
    }
}

/// Makes the child that `cmd` spawns a daemon: its own session (no controlling terminal, not
/// in the caller's process group, so Ctrl+C in the caller's terminal does not reach it).
pub fn detach(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
}

/// Forks this process into the background, for a daemon started on demand. The parent gets
/// `Some(child pid)` and should report and exit; the child gets `None`, runs in a new session
/// with stdin and stdout on `/dev/null` (stderr stays: it is the log), in `/`, with every other
/// descriptor it inherited closed except `keep`, and carries on.
///
/// Closing matters: a daemon started from inside a build (a nested `buildlock-client run`)
/// would otherwise keep whatever the build inherited, such as the outer lock's descriptor, for
/// as long as it lives. Leaving the starter's directory behind means the daemon never keeps a
/// file system busy (or a deleted directory alive).
///
/// Must be called while the process has a single thread (before any runtime or signal thread
/// starts): only the calling thread survives a fork.
pub fn fork_into_background(keep: &[BorrowedFd<'_>]) -> io::Result<Option<u32>> {
    let keep: Vec<RawFd> = keep.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: documented precondition: the process is single-threaded here, so the child
    // inherits no lock held by a vanished thread.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child.as_raw() as u32)),
        nix::unistd::ForkResult::Child => {
            nix::unistd::setsid()?;
            let null = fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
            nix::unistd::dup2_stdin(&null)?;
            nix::unistd::dup2_stdout(&null)?;
            drop(null);
            std::env::set_current_dir("/")?;
            close_inherited(&keep)?;
            Ok(None)
        }
    }
}

/// Closes every descriptor above stderr that is not in `keep`.
fn close_inherited(keep: &[RawFd]) -> io::Result<()> {
    let dir = if cfg!(target_os = "linux") { "/proc/self/fd" } else { "/dev/fd" };
    // Listed first, closed after: the listing's own descriptor is gone by then.
    let open: Vec<RawFd> =
        fs::read_dir(dir)?.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).collect();
    for fd in open.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // SAFETY: nothing in this freshly forked, single-threaded child owns these descriptors
        // (the caller passed the ones it still uses in `keep`), so no owner will use or close
        // them again; one already closed (the listing's own) only makes close fail with EBADF,
        // which is ignored. (A raw close: dropping an `OwnedFd` for it would abort on EBADF.)
        let _ = unsafe { nix::libc::close(fd) };
    }
    Ok(())
}

/// Sets the process's file mode creation mask to `mask`; returns the previous one.
pub fn set_umask(mask: u32) -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask as nix::libc::mode_t));
    old.bits() as u32
}

/// Points stdin, stdout and stderr at `/dev/null`, so a process that lives on in the background
/// keeps no caller's pipe or terminal open.
pub fn stdio_to_null() -> io::Result<()> {
    let null = fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

/// Whether the other end of stream socket `sock` has closed it (end of stream), looked at
/// without waiting and without consuming anything that is queued.
pub fn peer_closed(sock: BorrowedFd<'_>) -> bool {
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match nix::sys::socket::recv(sock.as_raw_fd(), &mut byte, flags) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e, nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR),
    }
}

/// Why the connection of stream socket `sock` (a copy of a remote lock's server session) has
/// ended, if it has: the peer closed it or reset it, or the kernel gave up on it (keepalives or
/// `TCP_USER_TIMEOUT` unanswered: the network is cut). Looked at without waiting and without
/// consuming anything queued (data the server sent to another copy's reader is left alone).
pub fn connection_ended(sock: BorrowedFd<'_>) -> Option<String> {
    ended_after(sock, Some(std::time::Duration::ZERO))
}

/// [`connection_ended`], waiting up to `timeout` for the connection to end (the peer's close
/// or reset, or the kernel giving up on it), without consuming anything queued.
pub fn wait_connection_ended(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> Option<String> {
    ended_after(sock, Some(timeout))
}

fn ended_after(sock: BorrowedFd<'_>, timeout: Option<std::time::Duration>) -> Option<String> {
    use nix::libc;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let events = libc::POLLRDHUP;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let events = 0;
    let revents = match poll_raw(&[(sock, events)], timeout) {
        Ok(r) => r[0],
        Err(e) => return Some(format!("its socket cannot be polled: {e}")),
    };
    if revents == 0 {
        return None;
    }
    // The error that ended it, if any (ETIMEDOUT: keepalives or `TCP_USER_TIMEOUT`).
    let pending = match revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        true => nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::SocketError).unwrap_or(0),
        false => 0,
    };
    if pending != 0 || revents & libc::POLLERR != 0 {
        let e = io::Error::from_raw_os_error(pending);
        return Some(match nix::errno::Errno::from_raw(pending) {
            nix::errno::Errno::ETIMEDOUT => {
                "the server stopped answering (keepalives unanswered: network cut off, or its host is down)".into()
            }
            nix::errno::Errno::ECONNRESET => "the server reset the connection".into(),
            _ => format!("the connection failed: {e}"),
        });
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let closed = revents & (libc::POLLHUP | libc::POLLRDHUP) != 0;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let closed = revents & libc::POLLHUP != 0 || peer_closed(sock);
    closed.then(|| "the server closed the connection (it was restarted, or ended the session)".into())
}

/// How long ago TCP socket `sock` last received an acknowledgement from its peer (Linux:
/// `TCP_INFO`'s `tcpi_last_ack_recv`; the peer's answers to keepalive probes count), or `None`
/// where that is not known (another platform, not a TCP socket). A link taken down never fails
/// the socket by itself (probes that cannot leave the host are retried, not counted), so a
/// holder that must know within a bound asks this.
pub fn last_heard(sock: BorrowedFd<'_>) -> Option<std::time::Duration> {
    #[cfg(target_os = "linux")]
    {
        use nix::libc;
        let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is a zeroed `tcp_info` of `len` bytes that the kernel fills (at most
        // `len` bytes); `sock` is a descriptor borrowed for the call.
        let r = unsafe {
            libc::getsockopt(sock.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
        };
        if r != 0 {
            return None;
        }
        // SAFETY: zeroed above (every field is an integer), then filled by the kernel.
        let info = unsafe { info.assume_init() };
        Some(std::time::Duration::from_millis(info.tcpi_last_ack_recv.into()))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sock;
        None
    }
}

/// Arms the kernel's dead man's switch on socket `sock` (a remote lock's server session) for
/// process `pid`'s group (or `pid` alone, if it leads none): from now on the kernel itself
/// sends SIGKILL to it the moment anything happens on the socket (it fails, keepalives or
/// `TCP_USER_TIMEOUT` unanswered; its peer closes or resets it; data arrives), whether or not
/// the process that armed it still lives. It is the last guard of a command holding a remote
/// lock when nobody is left to stop it on a loss. Whoever talks on the socket disarms it first
/// ([`disarm_kill_switch`]): an answer arriving would fire it.
///
/// Linux only (`F_SETOWN_EX`, `F_SETSIG`, `O_ASYNC`; not on MIPS or SPARC, whose numbers differ):
/// `Ok(false)` elsewhere. The switch is a
/// property of the open socket, shared by every copy (descriptors passed or duplicated), and is
/// gone with the last one. It names the group by its kernel identity, not its number: a group
/// that has ended is never confused with a later one that has its number.
pub fn arm_kill_switch(sock: BorrowedFd<'_>, pid: u32) -> io::Result<bool> {
    if !aim_kill_switch(sock, pid)? {
        return Ok(false);
    }
    #[cfg(target_os = "linux")]
    set_async(sock, true)?;
    Ok(true)
}

/// Names the target of [`arm_kill_switch`] on `sock` (process `pid`'s group, or `pid` alone if
/// it leads none, by the kernel's identity: see there) and its signal, SIGKILL, without arming
/// it: nothing is sent until `O_ASYNC` is set too (by [`arm_kill_switch`], or by the keeper of
/// [`keep_guard_after_death`]). Aimed while `pid` surely runs, the switch can never hit another
/// group that later has its number. Linux only: `Ok(false)` elsewhere.
pub fn aim_kill_switch(sock: BorrowedFd<'_>, pid: u32) -> io::Result<bool> {
    #[cfg(all(target_os = "linux", not(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64"))))]
    {
        use nix::libc;
        // `<asm-generic/fcntl.h>`, which the `libc` crate does not carry.
        const F_SETSIG: libc::c_int = 10;
        const F_SETOWN_EX: libc::c_int = 15;
        const F_OWNER_PID: libc::c_int = 1;
        const F_OWNER_PGRP: libc::c_int = 2;
        #[repr(C)]
        struct FOwnerEx {
            kind: libc::c_int,
            pid: libc::pid_t,
        }
        let leads =
            nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32))).is_ok_and(|g| g.as_raw() == pid as i32);
        let owner = FOwnerEx { kind: if leads { F_OWNER_PGRP } else { F_OWNER_PID }, pid: pid as libc::pid_t };
        let fd = sock.as_raw_fd();
        // SAFETY: `fd` is borrowed for the calls; `owner` is laid out as the kernel's
        // `struct f_owner_ex`, which it only reads.
        let set = unsafe {
            libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) == 0
                && libc::fcntl(fd, F_SETSIG, libc::SIGKILL) == 0
        };
        if !set {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }
    #[cfg(not(all(
        target_os = "linux",
        not(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64"))
    )))]
    {
        let _ = (sock, pid);
        Ok(false)
    }
}

/// Sets TCP socket `sock`'s `TCP_USER_TIMEOUT`: how long the kernel waits for sent data, or
/// for answers to keepalive probes, before it fails the connection (Linux only; a no-op
/// elsewhere).
pub fn set_tcp_user_timeout(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::TcpUserTimeout, &ms)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (sock, timeout);
    Ok(())
}

/// [`arm_kill_switch`] on a socket nobody will send on again, first setting its
/// `TCP_USER_TIMEOUT` to `user_timeout`: how long after the peer was last heard from (its last
/// answer to a keepalive probe) the kernel fails the socket, and so fires the switch.
pub fn arm_kill_switch_unwatched(
    sock: BorrowedFd<'_>,
    pid: u32,
    user_timeout: std::time::Duration,
) -> io::Result<bool> {
    set_tcp_user_timeout(sock, user_timeout)?;
    arm_kill_switch(sock, pid)
}

/// Disarms the switch [`arm_kill_switch`] armed on `sock`, if any.
pub fn disarm_kill_switch(sock: BorrowedFd<'_>) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    return set_async(sock, false);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sock;
        Ok(())
    }
}

/// The process that [`keep_guard_after_death`] started. [`GuardKeeper::dismiss`] ends it,
/// leaving the socket as it is; dropping this without dismissing it is what this process's
/// death does: the keeper arms the guard, then exits.
#[derive(Debug)]
pub struct GuardKeeper {
    /// The write end of the keeper's pipe: a byte says "go", its end without one says that this
    /// process died (or gave the guard up to the keeper).
    word: OwnedFd,
}

impl GuardKeeper {
    /// Ends the keeper without it touching the socket (the lease it guarded has ended). If it
    /// is gone already, there is nothing to tell.
    pub fn dismiss(self) {
        let _ = nix::unistd::write(&self.word, b"x");
    }
}

/// Keeps the kernel's guard on socket `sock` armed after this process dies, however it dies: a
/// process of its own waits on a pipe from this one and, when the pipe ends without a word (this
/// process is gone), arms the switch ([`arm_kill_switch`]), then exits. Its target and signal are
/// the caller's to set first: armed already ([`arm_kill_switch`]; the keeper arms it again in
/// case this process had disarmed it to talk on the socket, [`disarm_kill_switch`], since an
/// answer would fire it), or only aimed ([`aim_kill_switch`]) while this process watches the
/// lock itself. Either way the keeper sets `O_ASYNC` alone and names no process: it cannot hit
/// one that has a dead group's number. With `user_timeout`, it first sets the socket's
/// `TCP_USER_TIMEOUT` to it (nobody sends on the socket any more, so only keepalives left
/// unanswered fail it). [`GuardKeeper::dismiss`] ends the keeper, which then does nothing;
/// dropping it undismissed hands the guard over as a death would.
///
/// The keeper is forked twice (so it is nobody's child here, and is never left a zombie), leaves
/// this process's session (a signal to its terminal's group, or the terminal's hang-up, is not
/// for it) and after the fork makes system calls only (no allocation, no lock: the other threads
/// of this process are gone in it). It holds a copy of `sock` and of its pipe, and closes every
/// other descriptor it inherited, so it keeps nothing else of this process's open (locks,
/// sockets, other keepers' pipes). While it waits, its copy of `sock` is one more: the caller
/// dismisses the keeper before it relies on its own copy being the last.
///
/// Linux only (as [`arm_kill_switch`]): `Ok(None)` elsewhere.
pub fn keep_guard_after_death(
    sock: BorrowedFd<'_>,
    user_timeout: Option<std::time::Duration>,
) -> io::Result<Option<GuardKeeper>> {
    #[cfg(target_os = "linux")]
    {
        use nix::libc;
        let (wait_end, word) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (sock_fd, wait_fd) = (sock.as_raw_fd(), wait_end.as_raw_fd());
        let (low, high) = (sock_fd.min(wait_fd), sock_fd.max(wait_fd));
        // Computed here: only system calls run after the fork.
        let open_max = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft.min(1 << 20) as libc::c_int);
        // SAFETY: between the fork and `_exit` the children make only async-signal-safe system
        // calls (fork, setsid, close_range/close, read, setsockopt and fcntl through
        // `set_tcp_user_timeout` and `set_async`, which allocate nothing, _exit) on descriptors
        // they inherited; they take no lock, so the threads missing in them matter not.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Parent { child } => {
                drop(wait_end);
                // The first child only forks the keeper and exits at once. Reaped here; if it
                // cannot be (SIGCHLD ignored: reaped already), the keeper stands all the same,
                // and must not be told, by the pipe's end, that this process died.
                while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(child, None) {}
                Ok(Some(GuardKeeper { word }))
            }
            nix::unistd::ForkResult::Child => unsafe {
                if libc::fork() != 0 {
                    libc::_exit(0);
                }
                libc::setsid();
                let close = |from: libc::c_int, to: libc::c_int| {
                    if from <= to
                        && libc::syscall(libc::SYS_close_range, from as libc::c_uint, to as libc::c_uint, 0) != 0
                    {
                        for fd in from..=to.min(open_max) {
                            libc::close(fd);
                        }
                    }
                };
                close(3, low - 1);
                close(low + 1, high - 1);
                close(high + 1, libc::c_int::MAX);
                let mut byte = 0u8;
                loop {
                    match libc::read(wait_fd, (&raw mut byte).cast(), 1) {
                        0 => break,
                        1 => libc::_exit(0),
                        _ if *libc::__errno_location() == libc::EINTR => {}
                        _ => libc::_exit(1),
                    }
                }
                // The process that kept the guard is gone: armed, whatever it was doing.
                if let Some(t) = user_timeout {
                    let _ = set_tcp_user_timeout(sock, t);
                }
                let _ = set_async(sock, true);
                libc::_exit(0)
            },
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (sock, user_timeout);
        Ok(None)
    }
}

/// Sets or clears `O_ASYNC` (signal-driven I/O) on `sock`'s open file description.
#[cfg(target_os = "linux")]
fn set_async(sock: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_retain(fcntl(sock, FcntlArg::F_GETFL)?);
    let want = if on { flags | OFlag::O_ASYNC } else { flags - OFlag::O_ASYNC };
    if want != flags {
        fcntl(sock, FcntlArg::F_SETFL(want))?;
    }
    Ok(())
}

/// Waits until one of `fds` is readable (or `timeout` passes: `Ok(None)`); returns its index.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Option<std::time::Duration>) -> io::Result<Option<usize>> {
    let fds: Vec<_> = fds.iter().map(|fd| (*fd, nix::libc::POLLIN)).collect();
    poll_first(&fds, timeout)
}

/// Waits until `fd` is readable (`Ok(Some(0))`), or the peer of socket `hangup` has closed it
/// (`Ok(Some(1))`: Linux's `POLLRDHUP`, elsewhere `POLLHUP`; data queued on it does not count),
/// or `timeout` passes (`Ok(None)`).
pub fn wait_readable_or_hangup(
    fd: BorrowedFd<'_>,
    hangup: BorrowedFd<'_>,
    timeout: Option<std::time::Duration>,
) -> io::Result<Option<usize>> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let hung = nix::libc::POLLRDHUP;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let hung = 0;
    poll_first(&[(fd, nix::libc::POLLIN), (hangup, hung)], timeout)
}

/// Polls `fds` (each with the events wanted) until one has an event or `timeout` passes
/// (`Ok(None)`); returns the index of the first with one.
fn poll_first(
    fds: &[(BorrowedFd<'_>, nix::libc::c_short)],
    timeout: Option<std::time::Duration>,
) -> io::Result<Option<usize>> {
    Ok(poll_raw(fds, timeout)?.iter().position(|&r| r != 0))
}

/// Polls `fds` (each with the events wanted; retrying on EINTR) until one has an event or
/// `timeout` passes, and returns the events each has, as the kernel's bits. Not through nix's
/// `PollFd`: its `PollFlags` has no `POLLRDHUP`, and it reads back any events that carry it as
/// none at all (a peer's close seen as nothing).
fn poll_raw(
    fds: &[(BorrowedFd<'_>, nix::libc::c_short)],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<nix::libc::c_short>> {
    use nix::libc;
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|(fd, events)| libc::pollfd { fd: fd.as_raw_fd(), events: *events, revents: 0 }).collect();
    let ms = timeout.map_or(-1, |t| libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX));
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` entries for the call; its descriptors
        // are borrowed for it.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits for process `pid` to exit (at most `timeout`); `Ok(true)` once it has. Uses a pidfd
/// where the kernel has them, else looks every 20 ms.
pub fn wait_exit(pid: u32, timeout: Option<std::time::Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    match pidfd_open(pid) {
        Ok(Some(fd)) => Ok(wait_readable(&[fd.as_fd()], timeout)?.is_some()),
        Err(_) => Ok(true), // no such process
        Ok(None) => {
            let id = crate::identify(pid);
            while crate::process_state(&id) != crate::ProcessState::Dead {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Ok(false);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(true)
        }
    }
}

/// The listening sockets launchd created for this job's `Sockets` entry `name`
/// (`launch_activate_socket(3)`). Untested here (CI runs Linux).
#[cfg(target_os = "macos")]
pub fn launch_activate_socket(name: &str) -> io::Result<Vec<OwnedFd>> {
    use std::ffi::CString;
    extern "C" {
        fn launch_activate_socket(
            name: *const nix::libc::c_char,
            fds: *mut *mut nix::libc::c_int,
            cnt: *mut nix::libc::size_t,
        ) -> nix::libc::c_int;
    }
    let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut fds: *mut nix::libc::c_int = std::ptr::null_mut();
    let mut cnt: nix::libc::size_t = 0;
    // SAFETY: launchd fills `fds` with a malloc'd array of `cnt` descriptors that we now own;
    // we copy them out and free the array with free(3) as the manual says.
    let err = unsafe { launch_activate_socket(cname.as_ptr(), &mut fds, &mut cnt) };
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    let mut out = Vec::with_capacity(cnt);
    for i in 0..cnt {
        // SAFETY: i < cnt, and each descriptor is ours alone.
        out.push(unsafe { OwnedFd::from_raw_fd(*fds.add(i)) });
    }
    // SAFETY: allocated by launchd with malloc.
    unsafe { nix::libc::free(fds.cast()) };
    Ok(out)
}

/// The listening socket the service manager passed us (systemd's `LISTEN_FDS` protocol), if
/// any: the first passed descriptor, made close-on-exec. The environment variables are removed
/// so that nothing we start believes it was activated too.
#[cfg(target_os = "linux")]
pub fn systemd_listener() -> io::Result<Option<std::os::unix::net::UnixListener>> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if !ours || count == 0 {
        return Ok(None);
    }
    const SD_LISTEN_FDS_START: RawFd = 3;
    // SAFETY: by the LISTEN_FDS protocol, descriptor 3 was passed to this process (LISTEN_PID
    // is ours) and nothing else in it owns that descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(SD_LISTEN_FDS_START) };
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    Ok(Some(std::os::unix::net::UnixListener::from(fd)))
}

/// Raises this process's open-file limit to its hard limit, so a daemon holding one descriptor
/// per lease can hold thousands. Returns the limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // A process allowed to (root, CAP_SYS_RESOURCE) may also raise the hard limit: ten
    // thousand leases need twenty thousand descriptors, more than some systems' default.
    #[cfg(target_os = "linux")]
    if hard < 65_536 && setrlimit(Resource::RLIMIT_NOFILE, 65_536, 65_536).is_ok() {
        return Ok(65_536);
    }
    if soft >= hard {
        return Ok(soft);
    }
    // macOS refuses more than OPEN_MAX for an "unlimited" hard limit; fall back to that.
    let want = if cfg!(target_os = "macos") { hard.min(10_240) } else { hard };
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => Ok(want),
        Err(_) => Ok(soft),
    }
}

/// This process's open-file limit (the soft one, in force), if it can be read.
pub fn fd_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok().map(|(soft, _)| soft)
}

/// Whether `e` says the process (`EMFILE`) or the system (`ENFILE`) has no descriptor left.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(nix::libc::EMFILE | nix::libc::ENFILE))
}

/// A descriptor that becomes readable when process `pid` exits (Linux `pidfd_open`, 5.3+).
/// `Ok(None)` where the kernel has no pidfd; callers then poll [`crate::process_state`].
pub fn pidfd_open(pid: u32) -> io::Result<Option<OwnedFd>> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call with integer arguments; on success it returns a new
        // descriptor that we own.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(nix::libc::ENOSYS) => Ok(None),
            _ => Err(err),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Waits until `done`, failing with `what` after a minute.
    #[track_caller]
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !done() {
            assert!(start.elapsed() < std::time::Duration::from_secs(60), "{what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A process that kept a guard and died, disarmed: its keeper arms the guard again.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_kept_guard_is_armed_again_when_the_process_that_kept_it_dies() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (sock, _peer) = UnixStream::pair().unwrap();
        let armed = || OFlag::from_bits_retain(fcntl(&sock, FcntlArg::F_GETFL).unwrap()).contains(OFlag::O_ASYNC);
        assert!(!armed());
        // SAFETY: the child makes system calls only (the keeper's fork, pipe, waitpid) and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let keeper = keep_guard_after_death(sock.as_fd(), None);
                // Dies holding it, as a killed daemon does: no word to the keeper.
                std::mem::forget(keeper);
                unsafe { nix::libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
            }
        }
        // The keeper, on its own, sets O_ASYNC on the socket they share.
        wait_until("the keeper never armed the guard", armed);
    }

    /// A guard only aimed (as `run` leaves it while it watches the lock itself), kept by a
    /// process that then dies: its keeper arms it, with the `TCP_USER_TIMEOUT` asked for, and the
    /// switch kills the group when the peer speaks. A dismissed keeper leaves the socket alone.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_aimed_guard_is_armed_with_its_user_timeout_when_the_process_that_kept_it_dies() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::unix::process::ExitStatusExt;
        let timeout = std::time::Duration::from_millis(6_789);
        for dismissed in [true, false] {
            let (ours, mut peer, mut child) = connection_and_group();
            let armed = || OFlag::from_bits_retain(fcntl(&ours, FcntlArg::F_GETFL).unwrap()).contains(OFlag::O_ASYNC);
            let user_timeout =
                || nix::sys::socket::getsockopt(&ours, nix::sys::socket::sockopt::TcpUserTimeout).unwrap();
            assert!(aim_kill_switch(ours.as_fd(), child.id()).unwrap());
            assert!(!armed(), "aiming alone arms nothing");
            // SAFETY: the child makes system calls only (the keeper's fork, pipe, waitpid, write)
            // and exits.
            match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => {
                    let keeper = keep_guard_after_death(ours.as_fd(), Some(timeout));
                    match (dismissed, keeper) {
                        (true, Ok(Some(k))) => k.dismiss(),
                        // Dies holding it, as a killed `run` does: no word to the keeper.
                        (false, Ok(Some(k))) => std::mem::forget(k),
                        _ => unsafe { nix::libc::_exit(2) },
                    }
                    unsafe { nix::libc::_exit(0) };
                }
                nix::unistd::ForkResult::Parent { child } => {
                    let status = nix::sys::wait::waitpid(child, None).unwrap();
                    assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0), "no keeper started");
                }
            }
            if dismissed {
                // The keeper ends on the word, its copy of the socket with it: once no other
                // process holds the socket, nothing was armed or changed, and data arriving kills
                // nobody.
                let inode = format!("socket:[{}]", nix::sys::stat::fstat(&ours).unwrap().st_ino);
                let held_elsewhere = || {
                    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
                        p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).is_some_and(|pid| {
                            pid != std::process::id()
                                && std::fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
                                    fds.flatten().any(|fd| {
                                        std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == inode.as_str())
                                    })
                                })
                        })
                    })
                };
                wait_until("the dismissed keeper stayed", || !held_elsewhere());
                peer.write_all(b"x").unwrap();
                let mut byte = [0u8; 1];
                assert_eq!(std::io::Read::read(&mut &ours, &mut byte).unwrap(), 1);
                assert!(!armed() && user_timeout() == 0, "a dismissed keeper touched the socket");
                child.kill().unwrap();
                assert_eq!(child.wait().unwrap().signal(), Some(nix::libc::SIGKILL));
                continue;
            }
            wait_until("the keeper never armed the guard", armed);
            assert_eq!(user_timeout(), 6_789);
            peer.write_all(b"x").unwrap();
            assert_eq!(child.wait().unwrap().signal(), Some(nix::libc::SIGKILL), "the armed switch did not fire");
        }
    }

    /// A loopback TCP connection (our end, the peer's) and a `sleep` leading its own group.
    #[cfg(target_os = "linux")]
    fn connection_and_group() -> (std::net::TcpStream, std::net::TcpStream, std::process::Child) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        let child = Command::new("sleep").arg("60").process_group(0).spawn().unwrap();
        (ours, peer, child)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_armed_kill_switch_kills_the_group_when_the_peer_speaks_or_closes_and_a_disarmed_one_does_not() {
        use std::os::unix::process::ExitStatusExt;
        for close in [false, true] {
            let (ours, mut peer, mut child) = connection_and_group();
            assert!(arm_kill_switch(ours.as_fd(), child.id()).unwrap());
            // Only the switch is left: the arming side needs nothing more.
            match close {
                false => peer.write_all(b"x").unwrap(),
                true => drop(peer),
            }
            let status = child.wait().unwrap();
            assert_eq!(status.signal(), Some(nix::libc::SIGKILL), "close: {close}, {status:?}");
        }
        let (ours, mut peer, mut child) = connection_and_group();
        assert!(arm_kill_switch(ours.as_fd(), child.id()).unwrap());
        disarm_kill_switch(ours.as_fd()).unwrap();
        peer.write_all(b"x").unwrap();
        drop(peer);
        // Both events have reached our socket: readable, and at its end.
        let mut byte = [0u8; 2];
        assert_eq!(std::io::Read::read(&mut &ours, &mut byte).unwrap(), 1);
        assert_eq!(std::io::Read::read(&mut &ours, &mut byte).unwrap(), 0);
        // A SIGKILL sent is either pending still or done (a zombie): neither is seen.
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let field =
            |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().trim().to_owned();
        let pending =
            |name: &str| u64::from_str_radix(&field(name), 16).unwrap() & (1 << (nix::libc::SIGKILL - 1)) != 0;
        assert!(!field("State:").starts_with('Z'), "a disarmed switch fired");
        assert!(!pending("SigPnd:") && !pending("ShdPnd:"), "a disarmed switch fired: {status}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A peer's close that leaves our side open (a FIN: only `POLLRDHUP`, no `POLLHUP`) is a
    /// connection ended, seen at once and while waiting; nix's `PollFd` read it back as no
    /// event at all.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_half_closed_connection_is_seen_as_ended_and_as_a_hang_up() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        assert_eq!(connection_ended(ours.as_fd()), None);
        assert_eq!(wait_readable_or_hangup(r.as_fd(), ours.as_fd(), Some(std::time::Duration::ZERO)).unwrap(), None);
        // Last words, then the close: what a server ending a session sends.
        peer.write_all(b"bye").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let why = wait_connection_ended(ours.as_fd(), std::time::Duration::from_secs(60));
        assert!(why.as_deref().is_some_and(|w| w.contains("closed the connection")), "{why:?}");
        assert!(connection_ended(ours.as_fd()).is_some());
        assert_eq!(wait_readable_or_hangup(r.as_fd(), ours.as_fd(), None).unwrap(), Some(1));
        // Nothing queued was consumed by looking.
        let mut buf = [0u8; 8];
        assert_eq!(std::io::Read::read(&mut &ours, &mut buf).unwrap(), 3);
    }

    #[test]
    fn a_closed_peer_is_seen_without_consuming_what_is_queued() {
        let (mut a, b) = UnixStream::pair().unwrap();
        assert!(!peer_closed(b.as_fd()));
        a.write_all(b"x").unwrap();
        assert!(!peer_closed(b.as_fd()));
        drop(a);
        // The byte still queued is not lost by looking, and hides the end until it is read.
        assert!(!peer_closed(b.as_fd()));
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &b, &mut buf).unwrap(), 1);
        assert!(peer_closed(b.as_fd()));
    }

    #[test]
    fn a_descriptor_travels_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut f = fs::File::create(dir.path().join("x")).unwrap();
        f.write_all(b"payload").unwrap();
        assert_eq!(send_with_fd(a.as_fd(), b"hello", Some(f.as_fd())).unwrap(), 5);
        drop(f);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let got = fs::File::from(fds.pop().unwrap());
        assert_eq!(got.metadata().unwrap().len(), 7);
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap(), 0);
    }

    #[test]
    fn private_dirs_are_created_and_open_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path().join("rt");
        ensure_private_dir(&rt).unwrap();
        assert_eq!(fs::metadata(&rt).unwrap().permissions().mode() & 0o777, 0o700);
        fs::set_permissions(&rt, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private_dir(&rt).unwrap_err();
        assert!(err.contains("chmod 700"), "{err}");
    }

    #[test]
    fn symlinked_and_readable_dirs_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        ensure_private_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = ensure_private_dir(&link).unwrap_err();
        assert!(err.contains("symbolic link") && err.contains(&link.display().to_string()), "{err}");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        fs::set_permissions(&real, fs::Permissions::from_mode(0o750)).unwrap();
        let err = check_private_dir(&real).unwrap_err();
        assert!(err.contains("mode 750") && err.contains("chmod 700"), "{err}");
        assert!(ensure_private_dir(&real).is_err());
        assert_eq!(fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o750, "the mode was changed");
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(a.as_fd()).unwrap(), current_uid());
    }

    #[test]
    fn pidfd_is_readable_after_exit() {
        let mut child = Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap().expect("pidfd on this kernel");
        child.wait().unwrap();
        let mut fds = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
        assert_eq!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(), 1);
    }
}
