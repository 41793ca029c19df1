"""The Python package against real processes: exclusion with fasteners and the command line,
dead holders, stale locks, timeouts, re-entrancy, threads, fork, Ctrl+C, asyncio, the daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import pytest

import buildlock
from conftest import HANG_GUARD  # noqa: E402


def test_package_is_the_installed_one():
    # Never the source tree: the tests must exercise what pip installed.
    assert "site-packages" in buildlock.__file__, buildlock.__file__
    assert issubclass(buildlock.Timeout, buildlock.Error) and issubclass(buildlock.Timeout, TimeoutError)
    assert issubclass(buildlock.LockLost, buildlock.Error)


def test_buildlock_excludes_fasteners_both_ways(env, mode):
    path = env.path()
    lock = buildlock.Lock(path, mode=mode)
    with lock:
        assert env.fasteners("try", "plain", path).line() == "busy"
    holder = env.fasteners("hold", "plain", path)
    holder.expect("locked")
    assert lock.acquire(blocking=False) is False
    holder.send()
    holder.expect("released")
    assert lock.acquire(blocking=False) is True
    lock.release()


def test_buildlock_excludes_the_installed_command_line_both_ways(env):
    path = env.path()
    with buildlock.Lock(path, mode="direct"):
        busy = env.client("--no-daemon", "run", "-n", path, "--", "true")
        assert busy.wait() == 1, busy.stderr()
    holder = env.client("--no-daemon", "run", path, "--", sys.executable, "-c", "print('locked', flush=True); input()")
    holder.expect("locked")
    assert buildlock.Lock(path, mode="direct").acquire(blocking=False) is False
    holder.send()
    assert holder.wait() == 0
    assert buildlock.Lock(path, mode="direct").acquire(blocking=False) is True


def test_holder_killed_next_acquire_proceeds_at_once(env, mode):
    path = env.path()
    holder = env.hold(path, mode)
    holder.kill(signal.SIGKILL)
    # The timeout only guards against a hang: the lock is free the moment the holder is dead.
    lock = buildlock.Lock(path, mode=mode, timeout=HANG_GUARD)
    assert lock.acquire() is True
    lock.release()


def test_stale_soft_lock_with_dead_pid_is_recovered(env):
    path = env.path()
    holder = env.hold(path, "direct", "soft holder", soft=True)
    assert os.path.exists(path)
    holder.kill(signal.SIGKILL)
    # The lock file and metadata are left behind, naming a dead pid: stale, taken at once.
    assert os.path.exists(path)
    lock = buildlock.Lock(path, mode="direct", soft=True)
    assert lock.acquire(blocking=False) is True
    lock.release()


def test_leftover_metadata_of_a_dead_pid_does_not_block_an_os_lock(env):
    path = env.path()
    holder = env.hold(path, "direct", "old build")
    holder.kill(signal.SIGKILL)
    with open(path + ".pid", "w") as f:  # what a killed old tool leaves
        f.write('{"pid": %d, "timestamp": 1, "operation": "old", "hostname": "h"}' % holder.pid)
    assert buildlock.Lock(path, mode="direct").acquire(blocking=False) is True


def test_timeout_names_the_holder(env, mode):
    path = env.path()
    holder = env.hold(path, mode, "build:libfastled")
    with pytest.raises(buildlock.Timeout) as e:
        buildlock.Lock(path, mode=mode, timeout=0.2).acquire()
    assert isinstance(e.value, TimeoutError)
    assert f"pid {holder.pid}" in str(e.value) and "build:libfastled" in str(e.value), str(e.value)
    with pytest.raises(buildlock.Timeout):
        with buildlock.Lock(path, mode=mode, timeout=0.05):
            pass


def test_same_object_is_reentrant_and_counts(env):
    path = env.path()
    lock = buildlock.Lock(path, mode="direct")
    other = buildlock.Lock(path, mode="direct")
    with lock:
        token = lock.token
        with lock:
            assert lock.acquire() is True
            lock.release()
            assert lock.token == token
        # Still held after the inner exit.
        assert other.acquire(blocking=False) is False
    assert lock.token is None and not lock.is_locked
    assert other.acquire(blocking=False) is True
    other.release()
    with pytest.raises(buildlock.Error, match="not held"):
        lock.release()


def test_threads_share_a_lock(env):
    lock = buildlock.Lock(env.path(), mode="direct")
    inside = []
    overlaps = []
    done = []

    def work():
        for _ in range(30):
            with lock:
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                inside.pop()
        done.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD)
    assert len(done) == 4, "a thread never finished"
    assert not overlaps, "two threads held the lock at once"
    assert not lock.is_locked


def blocked_requests(path):
    """Lines of /proc/locks for lock requests blocked on the file `path` ("->" lines)."""
    if not os.path.exists("/proc/locks"):
        return []
    ino = f":{os.stat(path).st_ino} "
    with open("/proc/locks") as f:
        return [line for line in f if "->" in line and ino in line]


def in_child(body):
    """Runs `body()` in a forked child; returns what it returned (a string) once the child exited 0."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(r)
            os.write(w, body().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, report
    return report


@pytest.mark.parametrize("how", ["release", "check", "exit", "acquire"])
def test_fork_child_cannot_release_the_parents_lock(env, mode, how):
    path = env.path()
    lock = buildlock.Lock(path, mode=mode)
    lock.acquire()

    def child():
        try:
            if how == "exit":
                lock.__exit__(None, None, None)
            else:
                getattr(lock, how)()
            return "no error"
        except buildlock.Error as e:
            return str(e)

    msg = in_child(child)
    assert "belongs to process" in msg and str(os.getpid()) in msg, msg
    # The parent keeps its lock: a third process sees it held.
    assert env.fasteners("try", "plain", path).line() == "busy"
    assert lock.is_locked
    lock.release()
    assert env.fasteners("try", "plain", path).line() == "acquired"


def test_fork_child_finaliser_releases_nothing_and_child_takes_its_own(env, mode):
    path = env.path()
    holder = {"lock": buildlock.Lock(path, mode=mode)}
    holder["lock"].acquire()

    def child():
        import gc

        del holder["lock"]  # the child's only reference: its finaliser runs here
        gc.collect()
        own = buildlock.Lock(env.path("child"), mode=mode)
        got = own.acquire(blocking=False)
        own.release()
        return str(got)

    assert in_child(child) == "True"
    assert env.fasteners("try", "plain", path).line() == "busy"
    holder["lock"].release()
    assert env.fasteners("try", "plain", path).line() == "acquired"


def test_ctrl_c_interrupts_a_wait(env):
    path = env.path()
    env.hold(path, "daemon")
    waiter = env.python("wait", path, "daemon")
    waiter.expect("waiting")
    # Wait for the daemon to list the waiter, so the signal lands inside the wait.
    for _ in range(100000):
        [s] = buildlock.status(path)
        if s["waiters"]:
            break
    else:
        pytest.fail("the waiter never showed in status")
    waiter.p.send_signal(signal.SIGINT)
    assert waiter.wait() == 42, waiter.stderr()
    assert waiter.lines[-1] == "waiting" and waiter.line() == "interrupted"


def test_async_lock_waits_without_blocking_the_loop(env, mode):
    path = env.path()
    holder = env.hold(path, mode)

    async def main():
        alock = buildlock.AsyncLock(path, mode=mode)
        waiting = asyncio.ensure_future(alock.acquire())
        # This coroutine runs while the other waits; it lets the holder go only after several
        # turns of the loop, so a blocked loop would never get here and the wait would hang.
        for _ in range(10):
            await asyncio.sleep(0)
        assert not waiting.done()
        holder.send()
        assert await asyncio.wait_for(waiting, HANG_GUARD) is True
        assert alock.token is not None
        await alock.release()
        async with alock:
            assert alock.lock.is_locked

    asyncio.run(main())
    holder.expect("released")


def test_async_lock_wait_can_be_cancelled(env):
    path = env.path()
    holder = env.hold(path, "direct")

    async def main():
        alock = buildlock.AsyncLock(path, mode="direct")
        task = asyncio.ensure_future(alock.acquire())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return alock

    alock = asyncio.run(main())
    assert blocked_requests(path) == []
    holder.send()
    holder.expect("released")
    # The cancelled wait left nothing held, nor anything to take the lock later: it is free at
    # once, for this process too.
    lock = buildlock.Lock(path, mode="direct")
    assert lock.acquire(blocking=False)
    lock.release()
    assert not alock.lock.is_locked


def test_status_and_break(env, mode):
    path = env.path()
    holder = env.hold(path, mode, "op-status")
    [s] = buildlock.status(path)
    assert s["state"] == "held" and s["path"] == path
    h = s["holder"]
    assert h["pid"] == holder.pid and h["operation"] == "op-status" and h["host"] and h["since"]
    with pytest.raises(buildlock.Error, match="refusing"):
        buildlock.break_lock(path)
    names = [x["name"] for x in buildlock.status()]
    assert names, names
    holder.send()
    holder.expect("released")
    assert "not held" in buildlock.break_lock(path)


def test_daemon_is_started_from_the_package(env):
    lock = buildlock.Lock(env.path(), mode="daemon")
    with lock:
        assert lock.via_daemon is True
        assert lock.token
    st = env.client("daemon", "status")
    assert st.wait() == 0, st.stderr()
    # The daemon runs this package's own command.
    assert os.environ["BUILDLOCKD"] == buildlock.daemon_command()
    daemon_pid = int(open(env.runtime / "buildlockd.pid").read())
    assert "buildlockd" in open(f"/proc/{daemon_pid}/cmdline").read()


def test_fencing_tokens_grow(env, mode):
    lock = buildlock.Lock(env.path(), mode=mode)
    with lock:
        first = lock.token
    with lock:
        assert lock.token > first


def test_two_objects_in_one_thread_fail_instead_of_deadlocking(env, mode):
    path = env.path()
    first = buildlock.Lock(path, mode=mode)
    second = buildlock.Lock(path, mode=mode)
    with first:
        # No timeout: without the check this would wait forever.
        with pytest.raises(buildlock.Error, match="already holds lock"):
            second.acquire()
        # Another thread just waits, as another process would (here until its timeout).
        errors = []

        def other():
            try:
                buildlock.Lock(path, mode=mode, timeout=0.1).acquire()
            except buildlock.Timeout as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join(HANG_GUARD)
        assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0]), errors
        # The wait that timed out left no request in the kernel to take the lock, if only for a
        # moment, when `first` lets go (and so to make the attempt below fail).
        assert blocked_requests(path) == []
    assert second.acquire(blocking=False) is True
    second.release()


def test_a_lock_dropped_while_held_leaves_no_trace(env):
    path = env.path()
    lock = buildlock.Lock(path, mode="direct")
    lock.acquire()
    del lock  # released by its finaliser
    again = buildlock.Lock(path, mode="direct", timeout=HANG_GUARD)
    assert again.acquire() is True
    again.release()


def test_importing_buildlock_leaves_asyncio_unimported():
    # A killed holder's memory is torn down before the kernel frees its lock: asyncio (8 MB)
    # is loaded only by AsyncLock, not by every process that takes a lock.
    code = "import sys, buildlock; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", out
