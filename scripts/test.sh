#!/usr/bin/env bash
# Runs the whole test suite. The interop tests drive the real Python `fasteners` package, so a
# virtual environment with it is made first (once) in .venv/. Every test binary runs even when
# an earlier one failed (--no-fail-fast). Ends with one summary line,
# "tests: N passed, M failed, K ignored", added up over every test binary; just before it, one
# "FAILED: ..." line per reason the run failed (failed tests, a test binary killed by a signal,
# a compile error, any other non-zero exit of cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c 'import fasteners' >/dev/null 2>&1; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt
fi
export BUILDLOCK_TEST_PYTHON="$PWD/.venv/bin/python"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=${PIPESTATUS[0]}
echo
# Why the run failed, from cargo's own words.
grep -E '^error(\[E[0-9]+\])?: ' "$log" | grep -vE '^error: (test failed|[0-9]+ targets? failed)' | sort -u | sed 's/^/FAILED: cargo: /' || true
grep -E '^    `-p .*`$' "$log" | sed -E 's/^ *`(.*)`$/FAILED: test target \1/' || true
grep -E 'process didn.t exit successfully: .*\(signal: ' "$log" | sed -E 's/^.*successfully: `([^ `]*)[^(]*\((signal: [^)]*)\).*$/FAILED: test binary \1 killed (\2)/' || true
grep -E '^test result: FAILED' "$log" >/dev/null && echo "FAILED: some tests failed (see \"failures:\" above)"
if [ "$status" -ne 0 ]; then
    echo "FAILED: cargo test exited with status $status"
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "tests: %d passed, %d failed, %d ignored\n", p, f, g }' "$log"
exit "$status"
