#!/usr/bin/env python3
"""Kill-to-grant from Python, piece by piece, by substitution.

    .venv-bench/bin/python scripts/kill_pieces.py [N]

Run with the interpreter of the venv that `scripts/compare.py` made and installed the package
into. For each pair (holder, waiter) below, N times in turn: the holder takes the lock and is
SIGKILLed and reaped, as in compare.py's kill_to_grant; printed are the medians of SIGKILL to
the waiter's grant (`time.time()` printed by the waiter) and of SIGKILL to the holder's reaping.

Holders: `py-fcntl` (a bare Python process holding `fcntl.lockf`), `py-fcntl+thread` (the same
with one more thread, asleep), `py-fcntl+import` (the same after `import buildlock`), and
`pybuildlock-direct` / `-daemon` (compare.py's helper holding a `buildlock.Lock`). Waiters:
`py-fcntl` (blocked in `fcntl.lockf`: the kernel's wake-up and nothing else) and compare.py's
`buildlock.Lock` helper. Swapping one side at a time tells the pieces apart: what the holder's
process costs the kernel to tear down before its lock is freed, and what the waiter adds after
the kernel has woken it.
"""
import os, random, subprocess, sys, tempfile, time
from pathlib import Path

COMPARE = str(Path(__file__).resolve().parent / "compare.py")
PY = sys.executable
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
sys.path.insert(0, str(Path(COMPARE).parent))
from compare import Lines, expect  # noqa: E402

FCNTL_HOLD = """
import fcntl, sys, time
{imp}
f = open(sys.argv[1], 'a')
fcntl.lockf(f, fcntl.LOCK_EX)
print('locked', flush=True)
time.sleep(100000)
"""
FCNTL_WAIT = """
import fcntl, sys, time
{imp}
f = open(sys.argv[1], 'a')
print('waiting', flush=True)
fcntl.lockf(f, fcntl.LOCK_EX)
print('granted %.6f' % time.time(), flush=True)
"""

def holder_cmd(kind, path):
    if kind.startswith("pybuildlock"):
        return [PY, COMPARE, "--helper", "hold", kind, path]
    imp = {"py-fcntl+import": "import buildlock", "py-fcntl+thread": "import threading; threading.Thread(target=time.sleep, args=(1e5,), daemon=True).start()"}.get(kind, "")
    return [PY, "-c", FCNTL_HOLD.format(imp=imp), path]

def waiter_cmd(kind, path):
    if kind.startswith("pybuildlock"):
        return [PY, COMPARE, "--helper", "wait", kind, path]
    return [PY, "-c", FCNTL_WAIT.format(imp=""), path]

def once(env, hk, wk, path):
    h = subprocess.Popen(holder_cmd(hk, path), stdout=subprocess.PIPE, env=env)
    w = None
    try:
        expect(Lines(h.stdout), "locked", 30, hk)
        w = subprocess.Popen(waiter_cmd(wk, path), stdout=subprocess.PIPE, env=env)
        wl = Lines(w.stdout)
        expect(wl, "waiting", 30, wk)
        time.sleep(random.uniform(0.1, 0.3))
        killed = time.time()
        h.kill()
        h.wait()
        reaped = time.time()
        line, _ = wl.read(10)
        granted = float(line.split()[1])
        return (granted - killed) * 1e6, (reaped - killed) * 1e6
    finally:
        for p in (h, w):
            if p and p.poll() is None:
                p.kill()
            if p:
                p.wait()

def main():
    work = tempfile.mkdtemp(prefix="pieces-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDLOCK")}
    env["BUILDLOCK_RUNTIME_DIR"] = work + "/rt"
    env["BUILDLOCKD_IDLE_EXIT"] = "30"
    combos = [(h, "py-fcntl") for h in ["py-fcntl", "py-fcntl+thread", "py-fcntl+import", "pybuildlock-direct"]]
    combos += [("pybuildlock-direct", "pybuildlock-direct"), ("pybuildlock-daemon", "pybuildlock-daemon")]
    res = {c: ([], []) for c in combos}
    for i in range(N):
        for c in combos:  # in turn, so drift hits all alike
            g, r = once(env, c[0], c[1], f"{work}/{c[0]}-{c[1]}.lock")
            res[c][0].append(g); res[c][1].append(r)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"n={N}, load {os.getloadavg()[0]:.2f}")
    print(f"{'holder':22} {'waiter':20} {'kill->grant':>12} {'kill->reaped':>13}")
    for c, (g, r) in res.items():
        print(f"{c[0]:22} {c[1]:20} {med(g)/1000:9.2f} ms {med(r)/1000:10.2f} ms")
    client = Path(PY).parent / "buildlock-client"
    subprocess.run([client, "daemon", "stop"], env=env, capture_output=True)

if __name__ == "__main__":
    main()
