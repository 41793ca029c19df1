"""Drives the real Python `fasteners` package for buildlock's interop tests.

    fasteners_tool.py hold KIND PATH         take the lock, print "locked", hold it until stdin
                                             closes or a line arrives, release, print "released"
    fasteners_tool.py try KIND PATH          print "acquired" or "busy" (non-blocking)
    fasteners_tool.py incr PATH COUNTER N    N read-modify-write increments of COUNTER, each under
                                             an InterProcessLock on PATH; exits 99 if it ever
                                             finds the marker directory COUNTER.inside present
    fasteners_tool.py chaos DIR LOCKS MILLIS a worker of the chaos harness (tests/chaos.rs): for
                                             MILLIS ms, take lock lN.lock (N < LOCKS) in DIR/locks,
                                             shared or exclusive, and run the harness's critical
                                             section inside, logging to DIR/events

KIND is "plain" (InterProcessLock), "read" or "write" (InterProcessReaderWriterLock).
"""

import fcntl
import os
import random
import sys
import time

import fasteners


def acquire(kind, path, blocking):
    if kind == "plain":
        lock = fasteners.InterProcessLock(path)
        return lock, lock.acquire(blocking=blocking), lock.release
    lock = fasteners.InterProcessReaderWriterLock(path)
    if kind == "read":
        return lock, lock.acquire_read_lock(blocking=blocking), lock.release_read_lock
    if kind == "write":
        return lock, lock.acquire_write_lock(blocking=blocking), lock.release_write_lock
    raise SystemExit(f"unknown kind {kind!r}")


def main(argv):
    cmd = argv[1]
    if cmd == "hold":
        _, ok, release = acquire(argv[2], argv[3], blocking=True)
        assert ok
        print("locked", flush=True)
        sys.stdin.readline()
        release()
        print("released", flush=True)
    elif cmd == "try":
        _, ok, release = acquire(argv[2], argv[3], blocking=False)
        print("acquired" if ok else "busy", flush=True)
        if ok:
            release()
    elif cmd == "incr":
        path, counter, n = argv[2], argv[3], int(argv[4])
        lock = fasteners.InterProcessLock(path)
        for _ in range(n):
            with lock:
                try:
                    os.mkdir(counter + ".inside")
                except FileExistsError:
                    print("two holders at once", flush=True)
                    raise SystemExit(99)
                with open(counter) as f:
                    value = int(f.read() or "0")
                with open(counter, "w") as f:
                    f.write(str(value + 1))
                os.rmdir(counter + ".inside")
    elif cmd == "chaos":
        chaos(argv[2], int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


def now_us():
    return time.time_ns() // 1000


def chaos(d, locks, millis):
    """The same critical section as the Rust workers' (see tests/chaos.rs for the order)."""
    log = os.path.join(d, "events")
    inc = f"{os.getpid()}-{now_us()}"
    checks = [open(os.path.join(d, f"check{i}"), "a") for i in range(locks)]
    deadline = time.monotonic() + millis / 1000

    def event(line):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (line + "\n").encode())
        os.close(fd)

    while time.monotonic() < deadline:
        lock = random.randrange(locks)
        shared = random.randrange(10) < 3
        tag = "s" if shared else "x"
        kind = "read" if shared else random.choice(["plain", "write"])
        _, ok, release = acquire(kind, os.path.join(d, "locks", f"l{lock}.lock"), blocking=True)
        assert ok
        event(f"G {inc} {lock} {now_us()} {tag} fasteners")
        marker = os.path.join(d, f"inside-{lock}", f"{inc}.{tag}")
        open(marker, "w").close()
        try:
            fcntl.flock(checks[lock], (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            others = [m for m in os.listdir(os.path.join(d, f"inside-{lock}")) if m != f"{inc}.{tag}"]
            event(f"V {inc} {lock} {now_us()} {','.join(others) or '-'} {tag}")
        time.sleep(random.randrange(3000) / 1e6)
        fcntl.flock(checks[lock], fcntl.LOCK_UN)
        os.remove(marker)
        event(f"R {inc} {lock} {now_us()}")
        release()


if __name__ == "__main__":
    main(sys.argv)
