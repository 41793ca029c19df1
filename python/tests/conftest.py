"""Harness for the Python package's tests: a private lock directory and daemon runtime directory
per test, child processes whose output lines are awaited as events (never sleeps), and a daemon
stopped when its test ends. The tests import the installed package, never the source tree."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HELPER = HERE / "helper.py"
FASTENERS_TOOL = HERE.parent.parent / "tests" / "py" / "fasteners_tool.py"
# Bounds a wait for an event so that a broken build fails instead of hanging; never a measure.
HANG_GUARD = 60.0
# The pip-installed command line, beside this interpreter.
CLIENT = str(Path(sys.executable).parent / "buildlock-client")


class Proc:
    """A child process whose stdout lines are read as events."""

    def __init__(self, args, env=None, stdin=subprocess.PIPE):
        self.args = args
        self.p = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.lines = []

    @property
    def pid(self):
        return self.p.pid

    def line(self, guard=HANG_GUARD):
        """The next line of stdout (without the newline); fails if none comes in `guard` seconds."""
        end = time.monotonic() + guard
        while True:
            left = end - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"{self.args}: no output line within {guard}s; stderr: {self.stderr()}")
            ready, _, _ = select.select([self.p.stdout], [], [], left)
            if ready:
                raw = self.p.stdout.readline()
                if not raw:
                    pytest.fail(f"{self.args}: exited ({self.p.wait()}) without the line; stderr: {self.stderr()}")
                text = raw.decode().rstrip("\n")
                self.lines.append(text)
                return text

    def expect(self, prefix):
        text = self.line()
        assert text.startswith(prefix), f"{self.args}: expected {prefix!r}, got {text!r}; stderr: {self.stderr()}"
        return text

    def send(self, text="go"):
        self.p.stdin.write((text + "\n").encode())
        self.p.stdin.flush()

    def wait(self, guard=HANG_GUARD):
        try:
            return self.p.wait(guard)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args}: did not exit within {guard}s")

    def stderr(self):
        if self.p.poll() is None:
            return "(still running)"
        return self.p.stderr.read().decode(errors="replace")

    def kill(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        self.p.wait()

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            if f:
                f.close()


class Env:
    """One test's world: lock directory, runtime directory, environment, children."""

    def __init__(self, tmp: Path, monkeypatch):
        self.dir = tmp / "locks"
        self.dir.mkdir()
        self.runtime = tmp / "run"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDLOCK")}
        self.env["BUILDLOCK_DIR"] = str(self.dir)
        self.env["BUILDLOCK_RUNTIME_DIR"] = str(self.runtime)
        self.env["BUILDLOCKD_IDLE_EXIT"] = "60"
        if os.environ.get("BUILDLOCKD"):
            self.env["BUILDLOCKD"] = os.environ["BUILDLOCKD"]
        for k in list(os.environ):
            if k.startswith("BUILDLOCK") and k != "BUILDLOCKD":
                monkeypatch.delenv(k)
        for k in ("BUILDLOCK_DIR", "BUILDLOCK_RUNTIME_DIR", "BUILDLOCKD_IDLE_EXIT"):
            monkeypatch.setenv(k, self.env[k])
        self.procs = []

    def path(self, name="x"):
        return str(self.dir / f"{name}.lock")

    def spawn(self, args, **kw):
        p = Proc(args, env=self.env, **kw)
        self.procs.append(p)
        return p

    def python(self, *args, **kw):
        return self.spawn([sys.executable, str(HELPER), *args], **kw)

    def hold(self, path, mode, op="", soft=False):
        """A process holding `path`, once it says so."""
        p = self.python("hold", path, mode, op, *(["soft"] if soft else []))
        p.expect("locked")
        return p

    def fasteners(self, *args):
        return self.spawn([sys.executable, str(FASTENERS_TOOL), *args])

    def client(self, *args, **kw):
        return self.spawn([CLIENT, *args], **kw)

    def close(self):
        for p in self.procs:
            p.close()
        if self.runtime.exists():
            subprocess.run([CLIENT, "daemon", "stop"], env=self.env, capture_output=True, timeout=HANG_GUARD)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def env(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    yield e
    e.close()


@pytest.fixture(params=["direct", "daemon"])
def mode(request):
    return request.param


class PgServer:
    """A real PostgreSQL server of one test's own (as `tests/support/pg_server.rs` starts them):
    `initdb` into a temporary directory, `pg_ctl start` on a private socket directory and a free
    loopback port, password (SCRAM) logins over TCP, stopped at the end. As root (CI) the server
    runs as the `postgres` system user, since initdb refuses root."""

    USER = "buildlock"
    PASSWORD = "s3cret"

    def __init__(self):
        versions = sorted(
            (int(p.name), p / "bin")
            for p in Path("/usr/lib/postgresql").glob("*")
            if p.name.isdigit() and (p / "bin" / "initdb").exists()
        )
        if not versions:
            pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (.ci/run installs them)")
        self.bin = versions[-1][1]
        # Under /tmp itself, which the `postgres` user can reach (pytest's own directories are
        # private to this user).
        self.dir = Path(tempfile.mkdtemp(prefix="pg"))
        (self.dir / "sock").mkdir()
        (self.dir / "pwfile").write_text(self.PASSWORD + "\n")
        # For scripts/sweep_test_leftovers.sh, should this process be killed before the end.
        (self.dir / "owner").write_text(f"{os.getpid()}\n")
        self.as_postgres = os.geteuid() == 0
        try:
            self._start()
        except BaseException:
            # A start that failed half way leaves nothing behind either.
            self.stop()
            raise

    def _start(self):
        if self.as_postgres:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.dir)], check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run(
            "initdb", "-D", str(self.dir / "data"), "-U", self.USER, "--auth-local=trust",
            "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", f"--pwfile={self.dir / 'pwfile'}",
        )
        with open(self.dir / "data" / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir / 'sock'}'\nfsync = off\nmax_connections = 40\n"
            )
        self.pg_ctl("start")

    def _run(self, tool, *args):
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD)
        assert out.returncode == 0, f"{tool} failed: {out.stdout}{out.stderr}"
        return out.stdout

    def pg_ctl(self, action):
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "60", "-m",
                  "fast", action)

    @property
    def url(self):
        return f"postgres://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def psql(self, sql):
        return self._run("psql", "-h", str(self.dir / "sock"), "-p", str(self.port), "-U", self.USER, "-d",
                         "postgres", "-At", "-c", sql).strip()

    def stop(self):
        if (self.dir / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.dir / "data"), "-w", "-m", "immediate", "stop")
            except AssertionError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pg():
    server = PgServer()
    yield server
    server.stop()
