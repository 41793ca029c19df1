"""Drives the real Python `fasteners` package for buildlock's interop tests.

    fasteners_tool.py hold KIND PATH         take the lock, print "locked", hold it until stdin
                                             closes or a line arrives, release, print "released"
    fasteners_tool.py try KIND PATH          print "acquired" or "busy" (non-blocking)
    fasteners_tool.py incr PATH COUNTER N    N read-modify-write increments of COUNTER, each under
                                             an InterProcessLock on PATH; exits 99 if it ever
                                             finds the marker directory COUNTER.inside present

KIND is "plain" (InterProcessLock), "read" or "write" (InterProcessReaderWriterLock).
"""

import os
import sys

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
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv)
