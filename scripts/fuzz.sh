#!/usr/bin/env bash
# Bounded fuzzing run: every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET seconds each
# (default 30), one after the other. Stops at the first target that finds a crash and names the
# input that triggered it. Needs a nightly toolchain and cargo-fuzz; installs nothing.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# One target on its own, from fuzz/:
#   cargo +nightly fuzz run frame_decoder -- -max_total_time=60 -rss_limit_mb=2048
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-30}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]  (a whole number of seconds, default 30)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: 'cargo fuzz' (with a nightly toolchain) is not available" >&2
    echo "install with: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

targets=(frame_decoder message_decoder metadata_parser lock_name)
summary=()
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT

for target in "${targets[@]}"; do
    echo "== fuzz $target for ${secs}s"
    log="$log_dir/$target.log"
    status=0
    cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tee "$log" \
        || status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        artifact=$(grep -o 'artifacts/[^ ]*' "$log" | tail -n 1 || true)
        echo >&2
        echo "fuzz.sh: $target FAILED (exit $status)" >&2
        if [ -n "$artifact" ]; then
            echo "fuzz.sh: crashing input: fuzz/$artifact" >&2
            echo "fuzz.sh: reproduce: (cd fuzz && cargo +nightly fuzz run $target $artifact)" >&2
            echo "fuzz.sh: minimize:  (cd fuzz && cargo +nightly fuzz tmin $target $artifact)" >&2
        else
            echo "fuzz.sh: no crash artifact was written; the output above says why (build error?)" >&2
        fi
        exit 1
    fi
    # libFuzzer's last status line: "#EXECUTIONS DONE cov: C ft: F corp: N/SIZE ...".
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$done_line")
    cov=$(sed -nE 's/.* cov: ([0-9]+) .*/\1/p' <<<"$done_line")
    corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$done_line")
    summary+=("$(printf '%-16s ok  %4ss  execs=%s  cov=%s  corpus=%s' "$target" "$secs" "${execs:-?}" "${cov:-?}" "${corp:-?}")")
done

echo
echo "== fuzz summary (${secs}s per target, no crashes)"
printf '%s\n' "${summary[@]}"
