#!/usr/bin/env python3
"""System calls per operation, counted with strace: a figure that does not move with the load.

Counts, for every process involved (`strace -f -c`), the system calls of:

- `library direct`: one uncontended acquire+release through the `buildlock` library in direct
  mode (the on-disk protocol);
- `library daemon`: the same through a private daemon (client and daemon together: the bench
  starts the daemon, so `strace -f` follows it);
- `run direct` / `run daemon`: one `buildlock-client run NAME -- true` (all its processes; in
  daemon mode plus what the daemon, run under its own `strace -f`, did for it);
- `flock(1)`: one `flock FILE true`, for comparison.

The library figures come from the compare bench's loop mode (`cargo bench --bench compare --
--loop uncontended --mode MODE --iterations N`), run twice with different N: the difference,
divided by the difference in N, is the cost per operation without the process's start-up. The
daemon's own start-up and shutdown are taken off the same way for `run daemon`.

Usage: python3 scripts/syscalls.py [--quick] [--json] [--iterations N] [--runs K] [--only WHAT]
  --quick        fewer operations (CI)
  --json         one JSON object on stdout instead of the tables
  --iterations N library operations in the long run (default 2000; quick 400)
  --runs K       `run` invocations per mode (default 20; quick 5)
  --only WHAT    library, run (default both)

Builds what it needs with `cargo bench --no-run --bench compare` (release profile, which also
builds `buildlock-client` and `buildlockd`; honours CARGO_TARGET_DIR). Exit status: 0 when every measurement was made (whatever the figures are),
1 when one failed, 2 for bad usage, 3 when strace is missing. Targets (issue 9): direct mode <= 14
calls per acquire+release; the daemon path <= 30; they are printed, never enforced here.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"library direct": 14, "library daemon": 30}
SCRUB = [
    "BUILDLOCK_NO_DAEMON", "BUILDLOCK_SOFT", "BUILDLOCK_DIR", "BUILDLOCK_RUNTIME_DIR",
    "BUILDLOCK_STALE_AFTER", "BUILDLOCK_LOG", "BUILDLOCK_JSON", "BUILDLOCKD",
]


class Failed(Exception):
    pass


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(extra)
    return env


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")


def build():
    """Builds the compare bench with the CLI and the daemon beside it (release profile); returns
    the three executables' paths."""
    out = subprocess.run(
        ["cargo", "bench", "--no-run", "--quiet", "--bench", "compare", "--message-format", "json"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    bench = None
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "compare" \
                and msg.get("executable"):
            bench = msg["executable"]
    if not bench:
        raise Failed("cargo did not say where the compare bench was built")
    release = os.path.join(target_dir(), "release")
    return bench, os.path.join(release, "buildlock-client"), os.path.join(release, "buildlockd")


def parse_strace_c(path):
    """{syscall: (calls, errors)} from an `strace -c -o` summary."""
    counts = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5 or not fields[3].isdigit() or fields[-1] == "total":
                continue
            calls = int(fields[3])
            errors = int(fields[4]) if len(fields) == 6 and fields[4].isdigit() else 0
            counts[fields[-1]] = (calls, errors)
    return counts


def strace(cmd, env, out_dir, tag, **kw):
    """Runs `cmd` under `strace -f -c`; returns (CompletedProcess, counts)."""
    out = os.path.join(out_dir, f"{tag}.strace")
    proc = subprocess.run(["strace", "-f", "-c", "-o", out, "--"] + cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)
    if proc.returncode != 0:
        raise Failed(f"{' '.join(cmd)} failed under strace ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc, parse_strace_c(out)


def add(total, counts, factor=1):
    for name, (calls, errors) in counts.items():
        c, e = total.get(name, (0, 0))
        total[name] = (c + factor * calls, e + factor * errors)


def per_op(big, small, n):
    """(big - small) / n per syscall, keeping only what is left above rounding noise."""
    diff = {}
    add(diff, big)
    add(diff, small, -1)
    out = {}
    for name, (calls, errors) in diff.items():
        if calls / n >= 0.005 or calls / n <= -0.005:
            out[name] = (calls / n, errors / n)
    return out


def summary(label, counts, note):
    total = sum(c for c, _ in counts.values())
    failing = sum(e for _, e in counts.values())
    breakdown = sorted(((name, round(c, 2), round(e, 2)) for name, (c, e) in counts.items()),
                       key=lambda x: (-x[1], x[0]))
    return {"what": label, "calls_per_op": round(total, 2), "failing_per_op": round(failing, 2),
            "breakdown": [{"syscall": n, "calls": c, "errors": e} for n, c, e in breakdown],
            "target": TARGETS.get(label), "note": note}


def library(bench, mode, big, small, tmp):
    env = clean_env()
    counts = []
    for n in (big, small):
        _, c = strace([bench, "--loop", "uncontended", "--mode", mode, "--iterations", str(n)], env, tmp,
                      f"lib-{mode}-{n}", cwd=ROOT)
        counts.append(c)
    note = f"strace -f -c of the compare bench's loop mode, ({big} - {small} operations) / {big - small}"
    return summary(f"library {mode}", per_op(counts[0], counts[1], big - small), note)


def start_daemon(daemon, rt, tmp, tag):
    out = os.path.join(tmp, f"{tag}.strace")
    env = clean_env(BUILDLOCKD_IDLE_EXIT="600")
    proc = subprocess.Popen(["strace", "-f", "-c", "-o", out, "--", daemon, "--runtime-dir", rt], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        proc.wait()
        raise Failed(f"buildlockd under strace did not start: {line!r}")
    return proc, out


def stop_daemon(cli, rt, proc, out):
    subprocess.run([cli, "--runtime-dir", rt, "daemon", "stop"], env=clean_env(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise Failed("buildlockd did not stop within 60 s")
    if proc.returncode != 0:
        raise Failed(f"buildlockd under strace exited with {proc.returncode}")
    return parse_strace_c(out)


def cli_runs(cli, daemon, mode, runs, tmp):
    locks = os.path.join(tmp, "locks")
    rt = os.path.join(tmp, f"rt-{mode}")
    os.makedirs(locks, exist_ok=True)
    base = [cli, "--dir", locks, "--runtime-dir", rt]
    env = clean_env()
    if mode == "direct":
        base.append("--no-daemon")
        env["BUILDLOCK_NO_DAEMON"] = "1"
    total = {}
    if mode == "daemon":
        # The daemon's start-up and shutdown alone, to take off.
        proc, out = start_daemon(daemon, rt, tmp, "daemon-idle")
        idle = stop_daemon(cli, rt, proc, out)
        proc, out = start_daemon(daemon, rt, tmp, "daemon-busy")
    try:
        for i in range(runs):
            _, c = strace(base + ["run", f"cli-{mode}", "--", "true"], env, tmp, f"run-{mode}-{i}")
            add(total, c)
    finally:
        if mode == "daemon":
            busy = stop_daemon(cli, rt, proc, out)
    if mode == "daemon":
        add(total, busy)
        add(total, idle, -1)
    counts = {k: (c / runs, e / runs) for k, (c, e) in total.items() if abs(c / runs) >= 0.005}
    note = f"strace -f -c of each of {runs} runs"
    if mode == "daemon":
        note += ", plus the daemon's (strace -f -c) calls during them, less its start-up and shutdown"
    return summary(f"run {mode}", counts, note)


def flock_runs(runs, tmp):
    if not shutil.which("flock"):
        return None
    total = {}
    path = os.path.join(tmp, "flock.lock")
    for i in range(runs):
        _, c = strace(["flock", path, "true"], clean_env(), tmp, f"flock-{i}")
        add(total, c)
    counts = {k: (c / runs, e / runs) for k, (c, e) in total.items()}
    return summary("flock(1)", counts, f"strace -f -c of each of {runs} runs of flock FILE true")


def print_table(result):
    target = f" (target <= {result['target']})" if result.get("target") else ""
    print(f"{result['what']}: {result['calls_per_op']:.1f} system calls per operation{target}, "
          f"{result['failing_per_op']:.1f} of them failing")
    for row in result["breakdown"]:
        err = f"  ({row['errors']:.2f} failing)" if row["errors"] else ""
        print(f"    {row['calls']:8.2f}  {row['syscall']}{err}")
    print(f"    [{result['note']}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--only", choices=["library", "run"])
    args = ap.parse_args()
    if not shutil.which("strace"):
        print("syscalls.py: strace is not installed (apt-get install strace); nothing measured", file=sys.stderr)
        return 3
    big = args.iterations or (400 if args.quick else 2000)
    small = max(big // 10, 1)
    if big <= small:
        ap.error("--iterations must be at least 2")
    runs = args.runs or (5 if args.quick else 20)
    results, failures = [], []
    try:
        bench, cli, daemon = build()
    except (subprocess.CalledProcessError, Failed) as e:
        print(f"syscalls.py: build failed: {e}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="buildlock-syscalls-") as tmp:
        jobs = []
        if args.only in (None, "library"):
            jobs += [lambda m=m: library(bench, m, big, small, tmp) for m in ("direct", "daemon")]
        if args.only in (None, "run"):
            jobs += [lambda m=m: cli_runs(cli, daemon, m, runs, tmp) for m in ("direct", "daemon")]
            jobs.append(lambda: flock_runs(runs, tmp))
        for job in jobs:
            try:
                r = job()
            except (Failed, subprocess.CalledProcessError, OSError) as e:
                failures.append(str(e))
                print(f"syscalls.py: measurement failed: {e}", file=sys.stderr)
                continue
            if r is None:
                continue
            if r["calls_per_op"] <= 0:
                failures.append(f"{r['what']}: implausible count {r['calls_per_op']}")
            results.append(r)
    by = {r["what"]: r for r in results}
    if "flock(1)" in by:
        for mode in ("direct", "daemon"):
            r = by.get(f"run {mode}")
            if r:
                r["minus_flock"] = round(r["calls_per_op"] - by["flock(1)"]["calls_per_op"], 2)
    if args.json:
        print(json.dumps({"results": results, "failures": failures,
                          "strace": subprocess.run(["strace", "-V"], stdout=subprocess.PIPE, text=True)
                          .stdout.splitlines()[0], "date": time.strftime("%Y-%m-%d")}, indent=1))
    else:
        for r in results:
            print_table(r)
            if "minus_flock" in r:
                print(f"    [{r['minus_flock']:+.1f} compared with flock FILE true]")
            print()
        for r in results:
            t = r.get("target")
            if t is not None:
                # Per-op figures are differences of two runs: a few hundredths either way is noise.
                verdict = "met" if r["calls_per_op"] <= t + 0.05 else "missed"
                print(f"target {r['what']} <= {t}: {verdict} ({r['calls_per_op']:.1f})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
