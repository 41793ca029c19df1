//! Processes: who we are, whether another process is still the one that wrote a lock, and
//! how a child is stopped when its parent dies.
//!
//! A pid alone does not name a process: pids are recycled. A process is named here by
//! (pid, start time, boot id): on Linux the start time is `/proc/PID/stat` field 22 (clock ticks
//! since boot) and the boot id is `/proc/sys/kernel/random/boot_id`; elsewhere the start time is
//! seconds since the epoch as reported by `sysinfo`, and there is no boot id.

use std::io;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// A process as recorded in lock metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Platform-specific start time (see the module docs); `None` when it could not be read,
    /// in which case the pid alone is checked.
    pub start_time: Option<u64>,
    /// Linux boot id; a different boot means the process is gone whatever its pid.
    pub boot_id: Option<String>,
}

/// What the OS says about a recorded process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessState {
    /// Running, and (where a start time was recorded) the very same process.
    Alive,
    /// Exited, a zombie, or its pid now belongs to another process.
    Dead,
    /// The OS would not say (permission denied, unreadable process table); callers must assume
    /// the process is alive. The text says why.
    Unknown(String),
}

/// This process's identity.
///
/// Read once and cached: it cannot change, except across `fork`, which the cache notices by
/// the pid.
pub fn current_process() -> ProcessIdentity {
    static CACHE: Mutex<Option<ProcessIdentity>> = Mutex::new(None);
    let pid = current_pid();
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    match &*cache {
        Some(me) if me.pid == pid => me.clone(),
        _ => {
            let me = ProcessIdentity { pid, start_time: imp::start_time(pid).ok().flatten(), boot_id: boot_id() };
            *cache = Some(me.clone());
            me
        }
    }
}

/// This process's id, without a system call after the first.
///
/// `std::process::id()` asks the kernel every time (glibc no longer caches `getpid`); lock
/// metadata needs the pid several times per acquisition. The cached value is forgotten in the
/// child of every `fork` (a `pthread_atfork` handler, which `fork(3)`, std's `Command` and
/// `nix::unistd::fork` all run), so a child that locks names itself, never its parent. A child
/// made with a raw `clone` system call, which runs no such handler, must not use buildlock
/// before `exec`.
pub fn current_pid() -> u32 {
    imp_pid::current_pid()
}

/// How many times this process has forked (`fork(3)`, or std's `Command` when it forks; a
/// `posix_spawn` does not count, and its child inherits only what is not close-on-exec), counted
/// by the same `pthread_atfork` handlers; `None` where they cannot be installed. A descriptor
/// held across no fork (the count unchanged) is in no other process unless passed on.
pub fn forks() -> Option<u64> {
    imp_pid::forks()
}

/// A descriptor that the child of a `fork` must not keep: it is closed in the child at once (by
/// the same `pthread_atfork` handler that forgets [`current_pid`]). For files a process keeps
/// open between uses, such as an idle lock file kept for the next acquisition: a child sharing
/// its open file description would share the lock the parent takes on it next.
///
/// In a forked child the owner of the descriptor must not close it again (its number may have
/// been reused): it must forget the file, which it can tell by [`current_pid`] having changed.
#[derive(Debug)]
pub struct CloseInChild(usize);

impl CloseInChild {
    /// Registers `fd`; `None` when the table (64 descriptors) is full or fork handlers cannot
    /// be installed: then the caller must not keep the file.
    #[cfg(unix)]
    pub fn register(fd: &impl std::os::fd::AsRawFd) -> Option<CloseInChild> {
        imp_pid::register_close_in_child(fd.as_raw_fd()).map(CloseInChild)
    }

    /// No `fork` here: nothing to close.
    #[cfg(not(unix))]
    pub fn register<T>(_fd: &T) -> Option<CloseInChild> {
        Some(CloseInChild(usize::MAX))
    }
}

impl Drop for CloseInChild {
    fn drop(&mut self) {
        #[cfg(unix)]
        imp_pid::unregister_close_in_child(self.0);
    }
}

#[cfg(unix)]
mod imp_pid {
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
    use std::sync::Once;

    /// 0: not known (never read, or forgotten in a forked child).
    static PID: AtomicU32 = AtomicU32::new(0);
    /// Whether the fork handler is installed.
    static HANDLER: AtomicBool = AtomicBool::new(false);
    const SLOTS: usize = 64;
    /// Descriptors to close in a forked child; -1: free slot.
    static CLOSE_IN_CHILD: [AtomicI32; SLOTS] = [const { AtomicI32::new(-1) }; SLOTS];
    /// Forks of this process, counted in the parent.
    static FORKS: AtomicU64 = AtomicU64::new(0);

    extern "C" fn in_parent() {
        FORKS.fetch_add(1, Ordering::SeqCst);
    }

    extern "C" fn in_child() {
        // Async-signal-safe: atomic loads and stores and close(2); no allocation, no lock.
        PID.store(0, Ordering::SeqCst);
        for slot in &CLOSE_IN_CHILD {
            let fd = slot.swap(-1, Ordering::SeqCst);
            if fd >= 0 {
                // SAFETY: `fd` was registered by its owner while open and is unregistered before
                // the owner closes it; in this child the owner forgets it instead of closing it
                // (see `CloseInChild`), so this is its only close here.
                unsafe { nix::libc::close(fd) };
            }
        }
    }

    fn install_handler() -> bool {
        static REGISTER: Once = Once::new();
        REGISTER.call_once(|| {
            // SAFETY: `in_child` is a plain `extern "C"` function that only touches atomics and
            // calls close(2), which is safe in the child of a fork of a multi-threaded process;
            // `in_parent` only adds to an atomic; there is no `prepare` handler. Registration
            // happens once per process (`Once`).
            let rc = unsafe { nix::libc::pthread_atfork(None, Some(in_parent), Some(in_child)) };
            HANDLER.store(rc == 0, Ordering::SeqCst);
        });
        HANDLER.load(Ordering::SeqCst)
    }

    pub(super) fn register_close_in_child(fd: i32) -> Option<usize> {
        if fd < 0 || !install_handler() {
            return None;
        }
        CLOSE_IN_CHILD.iter().position(|slot| slot.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }

    pub(super) fn unregister_close_in_child(slot: usize) {
        if let Some(s) = CLOSE_IN_CHILD.get(slot) {
            s.store(-1, Ordering::SeqCst);
        }
    }

    pub(super) fn forks() -> Option<u64> {
        install_handler().then(|| FORKS.load(Ordering::SeqCst))
    }

    pub(super) fn current_pid() -> u32 {
        if !install_handler() {
            // Without the handler a cached pid could outlive a fork: never cache then.
            return std::process::id();
        }
        match PID.load(Ordering::SeqCst) {
            0 => {
                let pid = std::process::id();
                // A fork meanwhile cannot leave this value in the child: the child's handler
                // runs after the fork, in the child's own copy, and stores 0 there.
                let _ = PID.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst);
                pid
            }
            pid => pid,
        }
    }
}

#[cfg(not(unix))]
mod imp_pid {
    pub(super) fn current_pid() -> u32 {
        std::process::id()
    }

    /// No `fork` here.
    pub(super) fn forks() -> Option<u64> {
        Some(0)
    }
}

/// Process `pid` as it is now (its start time read from the OS), for recording it as a holder.
pub fn identify(pid: u32) -> ProcessIdentity {
    ProcessIdentity { pid, start_time: imp::start_time(pid).ok().flatten(), boot_id: boot_id() }
}

/// This boot's id (Linux), read once.
fn boot_id() -> Option<String> {
    static BOOT_ID: OnceLock<Option<String>> = OnceLock::new();
    BOOT_ID.get_or_init(imp::boot_id).clone()
}

/// Whether the process that `id` names is still running.
pub fn process_state(id: &ProcessIdentity) -> ProcessState {
    if id.pid == 0 || i32::try_from(id.pid).is_err() {
        return ProcessState::Unknown(format!("{} is not a valid process id", id.pid));
    }
    if let (Some(recorded), Some(now)) = (&id.boot_id, boot_id()) {
        if *recorded != now {
            return ProcessState::Dead;
        }
    }
    imp::state(id.pid, id.start_time)
}

/// The command line of a running process, for telling users who holds a lock.
pub fn command_line(pid: u32) -> Option<String> {
    imp::command_line(pid)
}

/// The arguments (argv, the program first) of a running process, for proving what a process is
/// before signalling it. `None` when it is gone or the OS will not say.
pub fn command_args(pid: u32) -> Option<Vec<String>> {
    #[cfg(target_os = "linux")]
    {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut args: Vec<String> = raw.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        if args.last().is_some_and(String::is_empty) {
            args.pop();
        }
        (!args.is_empty()).then_some(args)
    }
    #[cfg(not(target_os = "linux"))]
    {
        portable::command_args(pid)
    }
}

/// This machine's host name, as written into lock metadata.
///
/// Read once per process: a host renamed while a build runs keeps its old name here, which is
/// the name its locks were written under.
pub fn hostname() -> String {
    static HOSTNAME: OnceLock<String> = OnceLock::new();
    HOSTNAME.get_or_init(imp::hostname).clone()
}

/// Arranges for the child that `cmd` spawns to be killed (SIGKILL) if this process dies first,
/// so that a command never runs on after the lock it was started under is gone.
///
/// Linux: `PR_SET_PDEATHSIG`. Elsewhere this does nothing yet, and returns `false` so callers
/// can say so; macOS has no equivalent system call.
pub fn kill_on_parent_death(cmd: &mut Command) -> bool {
    imp::kill_on_parent_death(cmd)
}

/// Sends signal `signal` (a Unix signal number) to process `pid`. Windows: unsupported.
pub fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    imp::send_signal(pid, signal)
}

/// Sends `signal` (a Unix signal number; `None` only asks) to every process of process group
/// `pgid`. `Ok(false)` when the group has no process left. Async-signal-safe with a signal.
/// Windows: unsupported.
///
/// Asking (`None`) on Linux does not count zombies, which hold no descriptor and may wait long
/// for an init that reaps slowly; elsewhere they count until reaped.
pub fn signal_group(pgid: u32, signal: Option<i32>) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    if signal.is_none() && imp::group_has_live_process(pgid) == Some(false) {
        return Ok(false);
    }
    #[cfg(unix)]
    {
        use nix::errno::Errno;
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let sig = signal.map(Signal::try_from).transpose()?;
        match killpg(Pid::from_raw(pgid as i32), sig) {
            Ok(()) | Err(Errno::EPERM) => Ok(true),
            Err(Errno::ESRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (pgid, signal);
        Err(io::Error::new(io::ErrorKind::Unsupported, "process groups are not supported on Windows"))
    }
}

/// Has `f` run when this process exits normally (returns from `main` or calls `exit`), after
/// what it registered earlier has run (`atexit(3)`); `false` where that is not available. Not on
/// death by a signal.
pub fn at_exit(f: extern "C" fn()) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: `f` is a plain function with the C calling convention and no arguments,
        // which is what atexit(3) calls; it lives for the whole program.
        unsafe { nix::libc::atexit(f) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = f;
        false
    }
}

/// An id of the calling thread, for telling a process's threads apart (deadlock detection):
/// the kernel's thread id on Linux, elsewhere a number given to each thread of this process on
/// first use.
pub fn current_thread_id() -> u64 {
    // Remembered per thread, with the pid it was read in: a forked child's thread (a copy of the
    // forking one, thread-locals and all) has another pid, and reads its own.
    #[cfg(target_os = "linux")]
    {
        use std::cell::Cell;
        thread_local!(static TID: Cell<(u32, u64)> = const { Cell::new((0, 0)) });
        let pid = current_pid();
        TID.with(|t| match t.get() {
            (p, tid) if p == pid => tid,
            _ => {
                let tid = nix::unistd::gettid().as_raw() as u64;
                t.set((pid, tid));
                tid
            }
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        thread_local!(static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
        ID.with(|id| *id)
    }
}

/// The processes `pid` was started by, parent first, up to (not including) pid 1; empty if
/// `pid` is gone. A process started by a holder acts for it (deadlock detection).
pub fn ancestors(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut at = pid;
    // A bound on the walk: the chain may change under us (a parent exits, its children are
    // re-parented), but never loops for long.
    while out.len() < 64 {
        match imp::parent(at) {
            Some(parent) if parent > 1 && parent != at && !out.contains(&parent) => {
                out.push(parent);
                at = parent;
            }
            _ => break,
        }
    }
    out
}

/// Process facts through `sysinfo`, for platforms without `/proc`. Compiled everywhere so that
/// Linux CI type-checks it and compares it against `/proc`.
#[cfg_attr(target_os = "linux", allow(dead_code))]
mod portable {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System};

    /// (start time in seconds since the epoch, is a zombie), or `None` if no such process.
    pub(crate) fn lookup(pid: u32) -> Option<(u64, bool)> {
        let mut sys = System::new().ok()?;
        let p = Pid::from_u32(pid);
        sys.refresh_processes_specifics(ProcessesToUpdate::Some(&[p]), true, ProcessRefreshKind::nothing());
        sys.process(p).map(|pr| (pr.start_time(), pr.status() == ProcessStatus::Zombie))
    }

    pub(crate) fn command_line(pid: u32) -> Option<String> {
        command_args(pid).map(|cmd| cmd.join(" "))
    }

    pub(crate) fn parent(pid: u32) -> Option<u32> {
        let mut sys = System::new().ok()?;
        let p = Pid::from_u32(pid);
        sys.refresh_processes_specifics(ProcessesToUpdate::Some(&[p]), true, ProcessRefreshKind::nothing());
        sys.process(p).and_then(|pr| pr.parent()).map(|pp| pp.as_u32())
    }

    pub(crate) fn command_args(pid: u32) -> Option<Vec<String>> {
        let mut sys = System::new().ok()?;
        let p = Pid::from_u32(pid);
        let kind = ProcessRefreshKind::nothing().with_cmd(sysinfo::UpdateKind::Always);
        sys.refresh_processes_specifics(ProcessesToUpdate::Some(&[p]), true, kind);
        let cmd = sys.process(p)?.cmd().iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>();
        (!cmd.is_empty()).then_some(cmd)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn sysinfo_sees_this_process() {
            let (start, zombie) = super::lookup(std::process::id()).expect("own process visible");
            assert!(start > 0);
            assert!(!zombie);
            assert!(super::command_line(std::process::id()).is_some());
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use super::ProcessState;
    use std::io;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    /// (state letter, start time) from `/proc/PID/stat`. The command name (field 2) may contain
    /// spaces and parentheses, so fields are counted from the last `)`.
    fn stat(pid: u32) -> io::Result<(char, u64)> {
        let text = read_proc(&format!("/proc/{pid}/stat"))?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/{pid}/stat"));
        let rest = &text[text.rfind(')').ok_or_else(bad)? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state); field 22 (starttime) is index 19.
        let state = fields.first().and_then(|s| s.chars().next()).ok_or_else(bad)?;
        let start = fields.get(19).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        Ok((state, start))
    }

    pub(super) fn parent(pid: u32) -> Option<u32> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command: state (field 3), then ppid (field 4).
        text[text.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
    }

    pub(super) fn start_time(pid: u32) -> io::Result<Option<u64>> {
        Ok(Some(stat(pid)?.1))
    }

    /// Whether a process that is not a zombie is in group `pgid`, from `/proc/*/stat`; `None`
    /// if `/proc` cannot be read.
    pub(super) fn group_has_live_process(pgid: u32) -> Option<bool> {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let Some(close) = text.rfind(')') else { continue };
            // After the command: state (field 3), ppid, pgrp (field 5).
            let mut fields = text[close + 1..].split_whitespace();
            let state = fields.next().and_then(|s| s.chars().next());
            let pgrp = fields.nth(1).and_then(|s| s.parse::<u32>().ok());
            if pgrp == Some(pgid) && !matches!(state, Some('Z' | 'X')) {
                return Some(true);
            }
        }
        Some(false)
    }

    pub(super) fn boot_id() -> Option<String> {
        read_proc("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
    }

    /// A small `/proc` file in one `read` (plus open and close): `read_to_string` would ask
    /// its size first (0 for `/proc`), then read in growing pieces, six calls for a `stat`.
    /// A `/proc` file this small is produced whole by one read of a buffer larger than it.
    fn read_proc(path: &str) -> io::Result<String> {
        use std::io::Read;
        let mut buf = vec![0u8; 4096];
        let mut file = std::fs::File::open(path)?;
        let mut got = 0;
        loop {
            match file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    if got < buf.len() {
                        break; // all of it: a short read of a /proc file is its end
                    }
                    buf.resize(buf.len() * 2, 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub(super) fn state(pid: u32, start: Option<u64>) -> ProcessState {
        match stat(pid) {
            Ok((s, _)) if s == 'Z' || s == 'X' => ProcessState::Dead,
            Ok((_, now)) if start.is_some_and(|recorded| recorded != now) => ProcessState::Dead,
            Ok(_) => ProcessState::Alive,
            Err(e) if e.kind() == io::ErrorKind::NotFound => ProcessState::Dead,
            Err(e) => match kill(Pid::from_raw(pid as i32), None) {
                // /proc is hidden from us (hidepid) but kill(0) can still tell.
                Err(nix::errno::Errno::ESRCH) => ProcessState::Dead,
                _ => ProcessState::Unknown(format!("cannot read /proc/{pid}/stat: {e}")),
            },
        }
    }

    pub(super) fn command_line(pid: u32) -> Option<String> {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let parts: Vec<String> =
            raw.split(|&b| b == 0).filter(|p| !p.is_empty()).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }

    pub(super) fn hostname() -> String {
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into())
    }

    pub(super) fn kill_on_parent_death(cmd: &mut Command) -> bool {
        let parent = std::process::id() as i32;
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (prctl, getppid, kill); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died before prctl took effect; then nobody would
                // send the signal, so act on it now.
                if nix::unistd::getppid().as_raw() != parent {
                    let _ = kill(nix::unistd::getpid(), Signal::SIGKILL);
                }
                Ok(())
            });
        }
        true
    }

    pub(super) fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
        let sig = Signal::try_from(signal)?;
        kill(Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn proc_and_sysinfo_agree_this_process_lives() {
            // The portable path (used on macOS and Windows) must agree with /proc on Linux.
            let pid = std::process::id();
            assert!(super::stat(pid).is_ok());
            assert!(super::super::portable::lookup(pid).is_some());
        }

        #[test]
        fn command_name_with_parens_and_spaces_parses() {
            // Field counting must start after the last ')', whatever the command name holds.
            let dir = tempfile::tempdir().unwrap();
            let exe = dir.path().join("we ird) (name");
            std::fs::copy("/bin/sleep", &exe).unwrap();
            // A sibling test's fork may briefly hold the copy open for writing (ETXTBSY).
            let mut child = (0..100)
                .find_map(|_| match std::process::Command::new(&exe).arg("30").spawn() {
                    Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        None
                    }
                    other => Some(other.unwrap()),
                })
                .expect("the copy stayed busy");
            let (state, start) = super::stat(child.id()).unwrap();
            assert!(state != 'Z' && state != 'X', "state {state}");
            assert!(start > 0);
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

#[cfg(all(unix, not(target_os = "linux")))]
mod imp {
    use super::{portable, ProcessState};
    use std::io;
    use std::process::Command;

    use nix::errno::Errno;
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    pub(super) fn parent(pid: u32) -> Option<u32> {
        portable::parent(pid)
    }

    pub(super) fn start_time(pid: u32) -> io::Result<Option<u64>> {
        Ok(portable::lookup(pid).map(|(start, _)| start))
    }

    pub(super) fn boot_id() -> Option<String> {
        None
    }

    pub(super) fn state(pid: u32, start: Option<u64>) -> ProcessState {
        match kill(Pid::from_raw(pid as i32), None) {
            Err(Errno::ESRCH) => return ProcessState::Dead,
            Ok(()) | Err(Errno::EPERM) => {}
            Err(e) => return ProcessState::Unknown(format!("kill({pid}, 0) failed: {e}")),
        }
        match portable::lookup(pid) {
            Some((_, true)) => ProcessState::Dead,
            Some((now, _)) if start.is_some_and(|recorded| recorded != now) => ProcessState::Dead,
            Some(_) => ProcessState::Alive,
            None => ProcessState::Unknown(format!("process {pid} exists but its start time is unreadable")),
        }
    }

    pub(super) fn command_line(pid: u32) -> Option<String> {
        portable::command_line(pid)
    }

    pub(super) fn hostname() -> String {
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into())
    }

    pub(super) fn kill_on_parent_death(_cmd: &mut Command) -> bool {
        false
    }

    pub(super) fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
        let sig = Signal::try_from(signal)?;
        kill(Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }
}

#[cfg(windows)]
mod imp {
    use super::{portable, ProcessState};
    use std::io;
    use std::process::Command;

    pub(super) fn parent(pid: u32) -> Option<u32> {
        portable::parent(pid)
    }

    pub(super) fn start_time(pid: u32) -> io::Result<Option<u64>> {
        Ok(portable::lookup(pid).map(|(start, _)| start))
    }

    pub(super) fn boot_id() -> Option<String> {
        None
    }

    pub(super) fn state(pid: u32, start: Option<u64>) -> ProcessState {
        match portable::lookup(pid) {
            None => ProcessState::Dead,
            Some((now, _)) if start.is_some_and(|recorded| recorded != now) => ProcessState::Dead,
            Some(_) => ProcessState::Alive,
        }
    }

    pub(super) fn command_line(pid: u32) -> Option<String> {
        portable::command_line(pid)
    }

    pub(super) fn hostname() -> String {
        std::env::var("COMPUTERNAME").unwrap_or_else(|_| "localhost".into())
    }

    pub(super) fn kill_on_parent_death(_cmd: &mut Command) -> bool {
        false
    }

    pub(super) fn send_signal(_pid: u32, _signal: i32) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "signals are not supported on Windows"))
    }
}

/// Lets a write to a closed pipe end the process quietly, as it ends most Unix tools
/// (`buildlock-client status | head`): Rust ignores `SIGPIPE`, so `println!` would panic instead.
/// For commands that only print, never for one that holds a lock.
#[cfg(unix)]
pub fn end_on_closed_pipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: installs the default disposition, not a handler: no code of ours runs in signal
    // context, and no other thread of this process relies on SIGPIPE being ignored.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Windows has no `SIGPIPE`: nothing to do.
#[cfg(windows)]
pub fn end_on_closed_pipe() {}

#[cfg(all(test, unix))]
mod fork_tests {
    #[test]
    fn a_fork_is_counted_in_the_parent() {
        let before = super::forks().expect("fork handlers installed");
        // SAFETY: the child only calls `_exit`, which is async-signal-safe.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => unsafe { nix::libc::_exit(0) },
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("wait for the child");
            }
        }
        let after = super::forks().unwrap();
        // Other tests of this process may fork meanwhile: at least ours was counted.
        assert!(after > before, "fork not counted: {before} -> {after}");
    }
}
