"""A process holding or waiting for a buildlock lock, for the tests (run with the venv's python).

    helper.py hold PATH MODE [OP] [soft]   take the lock, print "locked TOKEN", hold it until a
                                           line arrives on stdin (or it closes), release, print
                                           "released"
    helper.py wait PATH MODE               print "waiting", wait for the lock; on Ctrl+C print
                                           "interrupted" and exit 42

MODE is "direct" or "daemon".
"""

import sys

import buildlock


def main(argv):
    cmd, path, mode = argv[1], argv[2], argv[3]
    if cmd == "hold":
        op = argv[4] if len(argv) > 4 else ""
        soft = len(argv) > 5 and argv[5] == "soft"
        lock = buildlock.Lock(path, mode=mode, operation=op, soft=soft)
        lock.acquire()
        print("locked", lock.token, flush=True)
        sys.stdin.readline()
        lock.release()
        print("released", flush=True)
    elif cmd == "wait":
        lock = buildlock.Lock(path, mode=mode)
        try:
            print("waiting", flush=True)
            lock.acquire()
            print("acquired", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(42)
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv)
