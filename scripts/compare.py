#!/usr/bin/env python3
"""Compares buildlock with flock(1), Python fasteners and filelock on this machine.

    python3 scripts/compare.py [--quick] [--only SCENARIO] [--out FILE]

Makes (or reuses) the virtual environment .venv-bench with the packages pinned in
tests/py/requirements-bench.txt, builds the Python package's wheel (python/, with maturin) and
installs it there, builds the release binaries and the `compare` bench, runs
`cargo bench --bench compare` (buildlock's figures, one JSON object per line), measures the
alternatives in the same run, prints one table per scenario and a "targets" block, and writes
the raw results to target/compare.json (or --out).

Figures only: a target that is missed is reported as MISS, not as an error. The exit status is
non-zero only if a measurement itself failed.

Scenarios: uncontended, handoff, kill_to_grant, contention8, cli_run (see benches/compare.rs and
docs/PERFORMANCE.md for what each one times and how).

The same file is also the measuring helper run inside the venv for the Python lock packages:
    compare.py --helper uncontended IMPL PATH N
    compare.py --helper hold IMPL PATH
    compare.py --helper wait IMPL PATH
    compare.py --helper contend IMPL PATH MARKER SECS
IMPL is fasteners (InterProcessLock), filelock (FileLock), softfilelock (SoftFileLock), or
pybuildlock-direct / pybuildlock-daemon (the Python package's buildlock.Lock, mode="direct" or
"daemon"; the daemon is the package's own, in a runtime directory of this run).

--no-rust-bench skips the Rust bench (and the cli_run scenario, which needs the release
binaries): the Python measurements alone, e.g.
    python3 scripts/compare.py --quick --no-rust-bench --only uncontended
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-bench"
REQUIREMENTS = ROOT / "tests" / "py" / "requirements-bench.txt"
SCENARIOS = ["uncontended", "handoff", "kill_to_grant", "contention8", "cli_run"]
IMPL_NAMES = {
    "fasteners": "fasteners",
    "filelock": "filelock FileLock",
    "softfilelock": "filelock SoftFileLock",
    "pybuildlock-direct": "buildlock.Lock direct (Python)",
    "pybuildlock-daemon": "buildlock.Lock daemon (Python)",
}
PYBUILDLOCK = ["pybuildlock-direct", "pybuildlock-daemon"]


# --- the helper, run inside the venv --------------------------------------------------------------


def make_lock(impl, path):
    if impl == "fasteners":
        import fasteners

        lock = fasteners.InterProcessLock(path)
        return lock.acquire, lock.release
    if impl in PYBUILDLOCK:
        import buildlock

        lock = buildlock.Lock(path, mode=impl.rsplit("-", 1)[1])
        return lock.acquire, lock.release
    import filelock

    cls = {"filelock": filelock.FileLock, "softfilelock": filelock.SoftFileLock}[impl]
    lock = cls(path)
    return lock.acquire, lock.release


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def helper(argv):
    cmd, impl, path = argv[0], argv[1], argv[2]
    acquire, release = make_lock(impl, path)
    if cmd == "uncontended":
        n = int(argv[3])
        for _ in range(max(n // 10, 1)):  # warm up
            acquire()
            release()
        samples = []
        clock = time.perf_counter
        for _ in range(n):
            t = clock()
            acquire()
            release()
            samples.append((clock() - t) * 1e6)
        say(json.dumps(samples))
    elif cmd == "hold":
        acquire()
        say("locked")
        time.sleep(100000)
    elif cmd == "wait":
        say("waiting")
        acquire()
        t = time.time()
        say(f"granted {t:.6f}")
        release()
    elif cmd == "contend":
        marker, secs = argv[3], float(argv[4])
        say("ready")
        sys.stdin.readline()
        waits, violations = [], 0
        clock = time.perf_counter
        deadline = clock() + secs
        while True:
            asked = clock()
            acquire()
            granted = clock()
            # The critical section: a second holder would find the marker there.
            try:
                os.mkdir(marker)
                os.rmdir(marker)
            except FileExistsError:
                violations += 1
            release()
            if granted >= deadline:
                break
            waits.append((granted - asked) * 1e6)
        say(json.dumps({"waits_us": waits, "violations": violations}))
    else:
        raise SystemExit(f"unknown helper command {cmd!r}")


# --- small tools -------------------------------------------------------------------------------


class Failed(Exception):
    """A measurement itself failed (not a slow result)."""


STARTED = time.monotonic()


def log(msg):
    print(f"compare.py [{time.monotonic() - STARTED:5.1f} s]: {msg}", file=sys.stderr, flush=True)


def summarize(scenario, impl, samples_us, **extra):
    s = sorted(samples_us)

    def at(q):
        return round(s[int((len(s) - 1) * q)], 1) if s else None

    row = {"scenario": scenario, "impl": impl, "median_us": at(0.5), "p90_us": at(0.9), "n": len(s)}
    row.update(extra)
    return row


class Lines:
    """Reads lines from a child's pipe with a timeout (select on the raw descriptor)."""

    def __init__(self, pipe):
        self.fd = pipe if isinstance(pipe, int) else pipe.fileno()
        self.buf = b""

    def read(self, timeout):
        """The next line (without newline) and time.time() of its arrival, or (None, None)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None, None
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # a pty whose other side has closed
                chunk = b""
            if not chunk:
                return None, None
            self.buf += chunk
        arrived = time.time()
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().rstrip("\r"), arrived


def expect(lines, want, timeout, who):
    line, arrived = lines.read(timeout)
    if line is None or not line.startswith(want):
        raise Failed(f"{who}: expected {want!r}, got {line!r}")
    return line, arrived


def stop(proc, group=False):
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
    proc.wait()


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


# --- setup -------------------------------------------------------------------------------------


def pins():
    out = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip()] = version.strip()
    return out


def ensure_venv():
    py = VENV / "bin" / "python"
    check = (
        "import importlib.metadata as m, sys, json; want = json.loads(sys.argv[1]); "
        "sys.exit(any(m.version(k) != v for k, v in want.items()))"
    )
    if py.exists() and subprocess.run([py, "-c", check, json.dumps(pins())], capture_output=True).returncode == 0:
        return py
    log(f"setting up {VENV.relative_to(ROOT)} from {REQUIREMENTS.relative_to(ROOT)}")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", REQUIREMENTS], check=True
    )
    return py


def install_python_package(py):
    """Builds python/'s wheel with maturin and installs it into the bench venv."""
    wheels = ROOT / "python" / "target" / "bench-wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    maturin = Path(py).parent / "maturin"
    log("maturin build --release (python/)")
    subprocess.run(
        [maturin, "build", "--release", "--locked", "-m", ROOT / "python" / "Cargo.toml", "-i", py, "--out", wheels],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    [wheel] = wheels.glob("buildlock-*.whl")
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--force-reinstall", "--no-deps", wheel],
        check=True,
    )


def build():
    log("cargo build --release --bins")
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    log("cargo bench --bench compare --no-run")
    subprocess.run(["cargo", "bench", "--bench", "compare", "--no-run"], cwd=ROOT, check=True)
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    return Path(meta["target_directory"]) / "release"


def machine():
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    df = sh(["df", "-T", "/tmp"]).splitlines()
    return {
        "nproc": sh(["nproc"]),
        "cpu": cpu,
        "kernel": sh(["uname", "-r"]),
        "tmp_fs": df[-1].split()[1] if len(df) > 1 else "",
        "loadavg_at_start": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "flock": sh(["flock", "--version"]),
        "commit": sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "uncommitted_changes": sh(["git", "-C", str(ROOT), "status", "--short", "--untracked-files=no"]).splitlines(),
    }


# --- buildlock (the Rust bench) ------------------------------------------------------------------


def run_rust_bench(quick, only):
    cmd = ["cargo", "bench", "--bench", "compare", "--"]
    if quick:
        cmd.append("--quick")
    if only:
        cmd += ["--only", only]
    log(" ".join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise Failed(f"cargo bench --bench compare exited {proc.returncode}")
    for row in rows:
        row.setdefault("harness", "rust")
    return rows


# --- the alternatives --------------------------------------------------------------------------


class Alternatives:
    def __init__(self, py, bindir, work, quick):
        self.py = str(py)
        self.bindir = bindir
        self.work = Path(work)
        self.quick = quick
        self.failures = []
        # The Python package's daemon: its own runtime directory, started on demand by the first
        # helper (the package points BUILDLOCKD at its own buildlockd), stopped by close().
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDLOCK")}
        self.env["BUILDLOCK_RUNTIME_DIR"] = str(self.work / "rt-py")
        self.env["BUILDLOCKD_IDLE_EXIT"] = "30"

    def close(self):
        client = Path(self.py).parent / "buildlock-client"
        if client.exists() and (self.work / "rt-py").exists():
            subprocess.run([client, "daemon", "stop"], env=self.env, capture_output=True)

    def helper(self, *args, **kw):
        return subprocess.Popen(
            [self.py, str(Path(__file__).resolve()), "--helper", *map(str, args)],
            stdout=subprocess.PIPE,
            env=self.env,
            **kw,
        )

    def scale(self, full, quick):
        return quick if self.quick else full

    # uncontended: in-process acquire+release loops.
    def uncontended(self):
        rows = []
        for impl in ["fasteners", "filelock", *PYBUILDLOCK]:
            log(f"uncontended acquire+release, {IMPL_NAMES[impl]}")
            n = self.scale(20000, 2000)
            out = subprocess.run(
                [self.py, str(Path(__file__).resolve()), "--helper", "uncontended", impl, self.work / f"u-{impl}.lock", str(n)],
                capture_output=True,
                text=True,
                env=self.env,
            )
            if out.returncode != 0:
                raise Failed(f"uncontended {impl}: {out.stderr.strip()}")
            rows.append(
                summarize(
                    "uncontended",
                    IMPL_NAMES[impl],
                    json.loads(out.stdout),
                    harness="python",
                    what="acquire+release, in-process Python loop, one lock object reused",
                )
            )
        return rows

    # kill_to_grant: holder SIGKILLed, waiter blocked in another process.
    def kill_to_grant(self):
        rows = []
        n = self.scale(40, 6)
        if shutil.which("flock"):
            self.series(rows, "flock(1)", self.kill_flock, n)
        for impl in ["fasteners", "filelock", *PYBUILDLOCK]:
            self.series(rows, IMPL_NAMES[impl], self.kill_py, impl, n)
        self.series(rows, IMPL_NAMES["softfilelock"], self.kill_soft, n)
        return rows

    def series(self, rows, name, measure, *args):
        """One implementation's measurement; a failure is recorded and the others go on."""
        log(f"SIGKILL of holder -> waiter granted, {name}")
        try:
            rows.append(measure(*args))
        except (Failed, OSError, subprocess.SubprocessError, ValueError) as e:
            self.failures.append(f"kill_to_grant {name}: {e}")
            log(f"FAILED kill_to_grant {name}: {e}")

    def kill_flock(self, n):
        return summarize(
            "kill_to_grant",
            "flock(1)",
            [self.kill_flock_once(self.work / "k-flock.lock") for _ in range(n)],
            harness="python",
            what="holder `flock FILE sh -c '...; exec sleep 1000'`, its process group SIGKILLed; waiter "
            "`flock --verbose FILE true` on a pty, grant = arrival of its 'getting lock took' line",
        )

    def kill_py(self, impl, n):
        path = self.work / f"k-{impl}.lock"
        return summarize(
            "kill_to_grant",
            IMPL_NAMES[impl],
            [self.kill_py_once(impl, path, 30.0) for _ in range(n)],
            harness="python",
            what="holder process SIGKILLed and reaped; waiter process prints time.time() at its grant",
        )

    def kill_soft(self, n):
        cap = self.scale(5.0, 2.0)
        samples, capped = [], 0
        for _ in range(n):
            took = self.kill_py_once("softfilelock", self.work / "k-soft.lock", cap)
            if took is None:
                capped += 1
                break  # the lock is left for dead, not slow: more samples would only add the cap
            samples.append(took)
        return summarize(
            "kill_to_grant",
            IMPL_NAMES["softfilelock"],
            samples,
            harness="python",
            cap_s=cap,
            capped=capped,
            what=f"as filelock; a waiter still blocked {cap:g} s after the kill counts as '> cap' and ends the series",
        )

    def kill_flock_once(self, path):
        holder = subprocess.Popen(
            ["flock", path, "sh", "-c", "echo locked; exec sleep 1000"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        waiter, master = None, None
        try:
            expect(Lines(holder.stdout), "locked", 10, "flock holder")
            # --verbose prints "getting lock took ..." as soon as flock(2) returns, but stdio
            # flushes it at once only on a terminal (on a pipe, only when flock exits): a pty.
            master, slave = os.openpty()
            waiter = subprocess.Popen(["flock", "--verbose", path, "true"], stdout=slave)
            os.close(slave)
            time.sleep(random.uniform(0.1, 0.3))  # let the waiter block in flock(2)
            if waiter.poll() is not None:
                raise Failed("flock waiter did not wait")
            killed = time.time()
            # flock(1) keeps the lock open in the command it runs, so the build's whole process
            # group dies, as on Ctrl+C or a CI timeout.
            os.killpg(holder.pid, signal.SIGKILL)
            # (Reaped only afterwards: the kernel drops the lock at exit, zombie or not, and the
            # line's arrival must be timed as it comes.)
            _, granted = expect(Lines(master), "flock: getting lock took", 10, "flock waiter")
            return (granted - killed) * 1e6
        finally:
            stop(holder, group=True)
            if waiter:
                stop(waiter)
            if master is not None:
                os.close(master)

    def kill_py_once(self, impl, path, cap):
        """Microseconds from SIGKILL to the waiter's grant, or None if it did not come within cap."""
        for leftover in [path, Path(str(path) + ".lock")]:
            try:
                os.unlink(leftover)  # a soft lock left by the previous sample
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
        holder = self.helper("hold", impl, path)
        waiter = None
        try:
            expect(Lines(holder.stdout), "locked", 30, f"{impl} holder")
            waiter = self.helper("wait", impl, path)
            wl = Lines(waiter.stdout)
            expect(wl, "waiting", 30, f"{impl} waiter")
            # Let the waiter reach its wait; a random delay, so the kill does not fall in step with
            # a polling waiter's schedule (fasteners: 10, 20, ... 100 ms; filelock: 50 ms).
            time.sleep(random.uniform(0.1, 0.3))
            if waiter.poll() is not None:
                raise Failed(f"{impl} waiter did not wait")
            killed = time.time()
            holder.kill()
            # Reaped at once, as by the shell that started the build: a zombie's pid still looks
            # alive to a lock that checks its holder's pid.
            holder.wait()
            line, _ = wl.read(cap)
            if line is None:
                return None
            if not line.startswith("granted "):
                raise Failed(f"{impl} waiter: got {line!r}")
            return (float(line.split()[1]) - killed) * 1e6
        finally:
            stop(holder)
            if waiter:
                stop(waiter)

    # contention8: 8 processes for a fixed wall time.
    def contention(self, contenders=8):
        rows = []
        secs = self.scale(3.0, 1.0)
        for impl in ["fasteners", "filelock"]:
            log(f"{contenders} contenders, {IMPL_NAMES[impl]}")
            path = self.work / f"c-{impl}.lock"
            marker = self.work / f"c-{impl}.inside"
            procs = [self.helper("contend", impl, path, marker, secs, stdin=subprocess.PIPE) for _ in range(contenders)]
            try:
                for p in procs:
                    expect(Lines(p.stdout), "ready", 30, f"{impl} contender")
                for p in procs:
                    p.stdin.write(b"go\n")
                    p.stdin.flush()
                results = []
                for p in procs:
                    out, _ = p.communicate(timeout=secs + 60)
                    if p.returncode != 0:
                        raise Failed(f"{impl} contender exited {p.returncode}")
                    results.append(json.loads(out))
            finally:
                for p in procs:
                    stop(p)
            ops = [len(r["waits_us"]) for r in results]
            total = sum(ops)
            rows.append(
                summarize(
                    "contention8",
                    IMPL_NAMES[impl],
                    [w for r in results for w in r["waits_us"]],
                    harness="python",
                    contenders=contenders,
                    kind="processes, one lock object each",
                    duration_s=secs,
                    ops=total,
                    ops_per_s=round(total / secs),
                    ops_each=ops,
                    shares=[o / total if total else 0 for o in ops],
                    fairness=(min(ops) / max(ops)) if max(ops) else 0.0,
                    violations=sum(r["violations"] for r in results),
                    what="median/p90: time from asking for the lock to getting it",
                )
            )
        return rows

    # cli_run: flock(1) and buildlock-client from Python's subprocess, taken in turn.
    def cli_run(self):
        if not shutil.which("flock"):
            return []
        log("cli_run from Python: flock(1) FILE true, buildlock-client run NAME -- true")
        cli = str(self.bindir / "buildlock-client")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDLOCK")}
        env["BUILDLOCKD"] = str(self.bindir / "buildlockd")
        env["BUILDLOCKD_IDLE_EXIT"] = "30"
        rt, locks = str(self.work / "rt"), str(self.work / "locks")
        base = [cli, "--dir", locks, "--runtime-dir", rt]
        subprocess.run(base + ["daemon", "start"], env=env, check=True, capture_output=True)
        cmds = {
            "buildlock direct": base + ["--no-daemon", "run", "cli-direct", "--", "true"],
            "buildlock daemon": base + ["run", "cli-daemon", "--", "true"],
            "flock(1)": ["flock", str(self.work / "cli-flock.lock"), "true"],
        }
        samples = {k: [] for k in cmds}
        n = self.scale(300, 40)
        try:
            for i in range(n + n // 10):
                for k, cmd in cmds.items():
                    t = time.perf_counter()
                    rc = subprocess.run(cmd, env=env).returncode
                    took = (time.perf_counter() - t) * 1e6
                    if rc != 0:
                        raise Failed(f"{' '.join(cmd)} exited {rc}")
                    if i >= n // 10:
                        samples[k].append(took)
        finally:
            subprocess.run(base + ["daemon", "stop"], env=env, capture_output=True)
        what = "whole process, Python subprocess.run, taken in turn with the other two"
        command = {
            "buildlock direct": "buildlock-client --no-daemon run NAME -- true",
            "buildlock daemon": "buildlock-client run NAME -- true (daemon running)",
            "flock(1)": "flock FILE true",
        }
        return [
            summarize("cli_run", k, v, harness="python", command=command[k], what=what) for k, v in samples.items()
        ]


# --- report ------------------------------------------------------------------------------------


def fmt_us(us):
    if us is None:
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.1f} µs"


def find(rows, scenario, impl, harness=None):
    for r in rows:
        if r["scenario"] == scenario and r["impl"] == impl and (harness is None or r.get("harness") == harness):
            return r
    return None


def median_text(r):
    if r.get("capped"):
        return f"> {r['cap_s']:g} s"
    return fmt_us(r["median_us"])


def ratio(a, b):
    if not a or not b or a.get("median_us") is None or b.get("median_us") is None or b["median_us"] == 0:
        return "-"
    return f"{a['median_us'] / b['median_us']:.2f}×"


BASELINES = {"uncontended": "fasteners", "handoff": "buildlock direct", "kill_to_grant": "flock(1)", "cli_run": "flock(1)"}


def tables(rows):
    out = []
    for scenario in SCENARIOS:
        rs = [r for r in rows if r["scenario"] == scenario]
        if not rs:
            continue
        out.append("")
        if scenario == "contention8":
            base = find(rows, scenario, "fasteners")
            out.append(f"## contention8 (8 contenders, {rs[0]['duration_s']:g} s each; ratio: throughput vs fasteners)")
            out.append("")
            out.append("| impl | kind | ops/s | ratio | fairness (min/max) | shares min–max | violations | wait median | wait p90 |")
            out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for r in rs:
                rat = f"{r['ops_per_s'] / base['ops_per_s']:.2f}×" if base and base["ops_per_s"] else "-"
                out.append(
                    f"| {r['impl']} | {r['kind']} | {r['ops_per_s']:.0f} | {rat} | {r['fairness']:.2f} | "
                    f"{min(r['shares']):.3f}–{max(r['shares']):.3f} | {r['violations']} | "
                    f"{fmt_us(r['median_us'])} | {fmt_us(r['p90_us'])} |"
                )
            continue
        base_impl = BASELINES[scenario]
        out.append(f"## {scenario} (ratio: median / median of {base_impl}, same harness)")
        out.append("")
        out.append("| impl | harness | median | p90 | n | ratio |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in rs:
            base = find(rows, scenario, base_impl, r.get("harness") if scenario == "cli_run" else None)
            rat = "> cap" if r.get("capped") else ratio(r, base)
            out.append(
                f"| {r['impl']} | {r.get('harness', '-')} | {median_text(r)} | {fmt_us(r['p90_us'])} | {r['n']} | {rat} |"
            )
    return out


def targets(rows):
    res = []

    def add(name, ok, detail):
        res.append({"target": name, "result": "n/a" if ok is None else ("PASS" if ok else "MISS"), "detail": detail})

    flock = find(rows, "cli_run", "flock(1)", "rust")
    for impl, label in [("buildlock daemon", "default, through the daemon"), ("buildlock direct", "--no-daemon")]:
        r = find(rows, "cli_run", impl, "rust")
        if r and flock:
            x = r["median_us"] / flock["median_us"]
            add(
                f"CLI `run` ({label}) at most 1.5× flock(1)",
                x <= 1.5,
                f"{fmt_us(r['median_us'])} / {fmt_us(flock['median_us'])} = {x:.2f}× (rust harness, medians)",
            )
    ours, theirs = find(rows, "uncontended", "buildlock direct"), find(rows, "uncontended", "fasteners")
    if ours and theirs:
        add(
            "library acquire+release (direct) faster than fasteners",
            ours["median_us"] < theirs["median_us"],
            f"{fmt_us(ours['median_us'])} vs {fmt_us(theirs['median_us'])} = {ours['median_us'] / theirs['median_us']:.2f}×",
        )
    ours = find(rows, "uncontended", IMPL_NAMES["pybuildlock-direct"])
    if ours and theirs:
        x = ours["median_us"] / theirs["median_us"]
        add(
            "Python buildlock.Lock acquire+release (direct) at most 1.5× fasteners",
            x <= 1.5,
            f"{fmt_us(ours['median_us'])} vs {fmt_us(theirs['median_us'])} = {x:.2f}×",
        )
    for impl in PYBUILDLOCK:
        r = find(rows, "kill_to_grant", IMPL_NAMES[impl])
        if r:
            add(f"kill-to-grant, {IMPL_NAMES[impl]}, at most 2 ms median", r["median_us"] <= 2000, f"median {fmt_us(r['median_us'])}")
    r = find(rows, "kill_to_grant", "buildlock daemon")
    if r:
        add("kill-to-grant through the daemon under 2 ms median", r["median_us"] < 2000, f"median {fmt_us(r['median_us'])}")
    r = find(rows, "contention8", "buildlock daemon")
    if r:
        add(
            "fairness within 20% across 8 contenders (daemon: min share ≥ 0.8 × max share)",
            r["fairness"] >= 0.8,
            f"min/max = {r['fairness']:.2f}, {r['violations']} violations",
        )
    r = find(rows, "contention8", "buildlock direct")
    if r:
        add(
            "(for information, not a target) fairness in direct mode, which has no queue",
            None,
            f"min/max = {r['fairness']:.2f}, {r['violations']} violations",
        )
    return res


# --- main --------------------------------------------------------------------------------------


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--helper":
        return helper(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and shorter runs (under a minute)")
    ap.add_argument("--only", choices=SCENARIOS, help="measure one scenario")
    ap.add_argument("--no-rust-bench", action="store_true", help="skip the Rust bench and cli_run: Python figures only")
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "compare.json", help="raw results [%(default)s]")
    args = ap.parse_args()
    failures = []

    py = ensure_venv()
    install_python_package(py)
    bindir = None if args.no_rust_bench else build()
    info = machine()
    rows = []
    if not args.no_rust_bench:
        try:
            rows += run_rust_bench(args.quick, args.only)
        except (Failed, json.JSONDecodeError) as e:
            failures.append(str(e))
    with tempfile.TemporaryDirectory(prefix="buildlock-compare-") as work:
        alt = Alternatives(py, bindir, work, args.quick)
        for scenario, measure in [
            ("uncontended", alt.uncontended),
            ("kill_to_grant", alt.kill_to_grant),
            ("contention8", alt.contention),
            ("cli_run", alt.cli_run),
        ]:
            if (args.only and args.only != scenario) or (bindir is None and scenario == "cli_run"):
                continue
            try:
                rows += measure()
            except (Failed, OSError, subprocess.SubprocessError, ValueError) as e:
                failures.append(f"{scenario}: {e}")
                log(f"FAILED {scenario}: {e}")
        alt.close()
        failures += alt.failures

    order = {s: i for i, s in enumerate(SCENARIOS)}
    rows.sort(key=lambda r: order[r["scenario"]])
    tgt = targets(rows)
    elapsed = time.monotonic() - STARTED
    info["loadavg_at_end"] = os.getloadavg()[0]
    lines = [
        f"# buildlock comparison, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
        f"{' (quick)' if args.quick else ''}",
        "",
        f"machine: {info['nproc']} cores, {info['cpu']}, kernel {info['kernel']}, /tmp on {info['tmp_fs']}, "
        f"load average {info['loadavg_at_start']:.2f} at start, {info['loadavg_at_end']:.2f} at end",
        f"code: commit {info['commit']}"
        + (f", with uncommitted changes in {len(info['uncommitted_changes'])} file(s)" if info["uncommitted_changes"] else ""),
    ]
    lines += tables(rows)
    lines += ["", "## targets (ratios on this machine)", ""]
    lines += [f"{t['result']:<5} {t['target']}: {t['detail']}" for t in tgt]
    if failures:
        lines += ["", "## failed measurements", ""] + [f"- {f}" for f in failures]
    lines += ["", f"took {elapsed:.1f} s"]
    print("\n".join(lines))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "quick": args.quick,
                "machine": info,
                "results": rows,
                "targets": tgt,
                "failures": failures,
                "seconds": round(elapsed, 1),
            },
            indent=2,
        )
        + "\n"
    )
    log(f"raw results in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
