#!/usr/bin/env bash
# Runs the whole test suite. The interop tests drive the real Python `fasteners` package, so a
# virtual environment with it is made first (once) in .venv/. Ends with one summary line,
# "tests: N passed, M failed", added up over every test binary.
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
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
