"""Remote locks (PostgreSQL) from Python: the library's backend, on a real server each test
starts (`conftest.PgServer`), against the real command line and real processes."""

from __future__ import annotations

import os
import time

import pytest

import buildlock
from conftest import HANG_GUARD


def busy_for_the_cli(env, pg, name):
    """Whether `buildlock-client --backend URL run -n NAME` finds the lock taken (exit 1)."""
    c = env.client("--backend", pg.url, "run", "-n", name, "--", "true")
    code = c.wait()
    assert code in (0, 1), f"run -n exited {code}: {c.stderr()}"
    return code == 1, c.stderr()


def test_a_remote_lock_excludes_the_command_line_both_ways_and_names_its_holder(env, pg, mode):
    lock = buildlock.Lock("deploy", backend=pg.url, mode=mode, operation="deploying", timeout=0.3)
    assert lock.backend == f"postgres://127.0.0.1:{pg.port}/postgres"
    assert "s3cret" not in lock.backend
    with lock:
        assert lock.token >= 1
        busy, stderr = busy_for_the_cli(env, pg, "deploy")
        assert busy, "the command line took a lock Python holds"
        assert f"pid {os.getpid()}" in stderr and "deploying" in stderr, stderr
        first = lock.token
    assert not busy_for_the_cli(env, pg, "deploy")[0], "still taken after the release"
    holder = env.client("--backend", pg.url, "run", "deploy", "--", "sh", "-c", "echo locked; read x")
    holder.expect("locked")
    with pytest.raises(buildlock.Timeout) as e:
        lock.acquire()
    assert isinstance(e.value, TimeoutError)
    assert "deploy" in str(e.value) and "held by pid " in str(e.value), str(e.value)
    holder.send()
    assert holder.wait() == 0
    assert lock.acquire(blocking=False)
    assert lock.token > first
    lock.release()


def test_the_backend_comes_from_the_argument_the_environment_or_the_config_file(env, pg, monkeypatch, tmp_path):
    server = f"postgres://127.0.0.1:{pg.port}/postgres"
    monkeypatch.setenv("BUILDLOCK_BACKEND", pg.url)
    assert buildlock.Lock("a").backend == server
    assert buildlock.Lock("a", backend="local").backend is None
    monkeypatch.delenv("BUILDLOCK_BACKEND")
    assert buildlock.Lock("a").backend is None
    config = tmp_path / "config.toml"
    config.write_text(f'[[locks]]\nmatch = "deploy-*"\nbackend = "{pg.url}"\n')
    monkeypatch.setenv("BUILDLOCK_CONFIG", str(config))
    routed = buildlock.Lock("deploy-1", mode="direct")
    assert routed.backend == server
    assert buildlock.Lock("build").backend is None
    with routed:
        assert busy_for_the_cli(env, pg, "deploy-1")[0]
    with pytest.raises(ValueError, match="soft"):
        buildlock.Lock("deploy-2", soft=True)
    config.write_text('[[locks]]\nmatch = "x"\nbackend = "ftp://h"\n')
    with pytest.raises(buildlock.Error, match="config.toml"):
        buildlock.Lock("x")
    with pytest.raises(buildlock.Error, match="ftp"):
        buildlock.Lock("x", backend="ftp://h")


def test_a_killed_remote_holder_frees_the_lock_and_tokens_keep_growing(env, pg, mode):
    env.env["BUILDLOCK_BACKEND"] = pg.url
    holder = env.hold("killed", mode)
    token = int(holder.lines[-1].split()[1])
    lock = buildlock.Lock("killed", backend=pg.url, mode=mode)
    assert not lock.acquire(blocking=False)
    holder.kill()
    # The server frees it once it sees the holder's connections close: a bound, not a measure.
    assert lock.acquire(timeout=HANG_GUARD)
    assert lock.token > token
    lock.release()


def test_a_remote_lock_whose_session_ends_is_reported_lost(env, pg, mode):
    lock = buildlock.Lock("lost", backend=pg.url, mode=mode)
    lock.acquire()
    ended = pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted")
    assert ended == "1"
    end = time.monotonic() + HANG_GUARD
    while True:
        try:
            lock.check()
        except buildlock.LockLost as e:
            assert "lost" in str(e) and f"127.0.0.1:{pg.port}" in str(e), str(e)
            break
        assert time.monotonic() < end, "the loss was never reported"
        time.sleep(0.01)
    with pytest.raises(buildlock.LockLost):
        lock.release()
    # Lost means free on the server: anyone may take it.
    assert not busy_for_the_cli(env, pg, "lost")[0]


def test_a_forked_child_leaves_its_parents_remote_lease_alone(env, pg, mode):
    lock = buildlock.Lock("forked", backend=pg.url, mode=mode)
    lock.acquire()
    pid = os.fork()
    if pid == 0:
        try:
            lock.release()
            os._exit(1)
        except buildlock.Error:
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child released its parent's lease, or failed"
    assert busy_for_the_cli(env, pg, "forked")[0], "the parent lost its lock to its child's exit"
    lock.release()
    assert not busy_for_the_cli(env, pg, "forked")[0]


def test_status_lists_remote_holders_and_waiters_from_every_process(env, pg, mode, monkeypatch):
    holder = buildlock.Lock("shown", backend=pg.url, mode=mode, operation="deploying")
    holder.acquire()
    waiter = env.client("--backend", pg.url, "run", "-o", "next", "shown", "--", "echo", "granted")
    # The waiter is in the server's queue once status lists it: an event, polled with a bound.
    end = time.monotonic() + HANG_GUARD
    while True:
        [entry] = buildlock.status("shown", backend=pg.url)
        if entry["waiters"]:
            break
        assert time.monotonic() < end, f"the waiter never showed: {entry}"
        time.sleep(0.01)
    assert entry["path"] == f"shown on postgres://127.0.0.1:{pg.port}/postgres"
    assert (entry["state"], entry["kind"]) == ("held", "remote")
    h = entry["holder"]
    assert (h["pid"], h["operation"], h["mode"], h["token"]) == (os.getpid(), "deploying", "exclusive", holder.token)
    assert entry["waiters"][0]["operation"] == "next"
    # Listing everything: the remote lock among the local ones, through $BUILDLOCK_BACKEND too.
    with monkeypatch.context() as m:
        m.setenv("BUILDLOCK_BACKEND", pg.url)
        assert "shown" in [e["name"] for e in buildlock.status() if e["kind"] == "remote"]
    holder.release()
    assert waiter.line() == "granted"
    assert waiter.wait() == 0
    [entry] = buildlock.status("shown", backend=pg.url)
    assert (entry["state"], entry["holder"], entry["waiters"]) == ("free", None, [])
