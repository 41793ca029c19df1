#!/usr/bin/env bash
# Removes what test processes killed outright (SIGKILL, a CI timeout) left behind, where their
# Drop guards could not run: the network namespaces of tests/support/netns.rs (`blk-PID-K`,
# with the processes still inside them) and the PostgreSQL servers of tests/support/pg_server.rs
# (a temporary `pg*` directory whose `owner` file names the test process). Only those whose test
# process is gone are touched; a running test's are left alone. Says what it removed.
set -u
tmp=${TMPDIR:-/tmp}
if command -v ip >/dev/null 2>&1; then
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^blk-[0-9]+-[0-9]+$'); do
        pid=${ns#blk-}
        pid=${pid%%-*}
        [ -d "/proc/$pid" ] && continue
        # The namespace (and its veth pair) lives while a process is inside it.
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns delete "$ns" && echo "sweep: removed network namespace $ns (test process $pid is gone)"
    done
fi
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
for owner in "$tmp"/pg*/owner; do
    [ -f "$owner" ] || continue
    dir=$(dirname "$owner")
    pid=$(cat "$owner")
    [ -d "/proc/$pid" ] && continue
    if [ -f "$dir/data/postmaster.pid" ] && [ -n "$bin" ]; then
        if [ "$(id -u)" = 0 ]; then
            setpriv --reuid postgres --regid postgres --init-groups -- "$bin/pg_ctl" -D "$dir/data" -w -m immediate stop >/dev/null 2>&1
        else
            "$bin/pg_ctl" -D "$dir/data" -w -m immediate stop >/dev/null 2>&1
        fi
    fi
    rm -rf "$dir" && echo "sweep: removed the PostgreSQL server in $dir (test process $pid is gone)"
done
exit 0
