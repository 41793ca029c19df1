#!/usr/bin/env bash
# Runs the whole test suite. The interop tests drive the real Python `fasteners` package, so a
# virtual environment with it is made first (once) in .venv/. Every test binary runs even when
# an earlier one failed (--no-fail-fast). Ends with one summary line,
# "tests: N passed, M failed, K ignored", added up over every test binary; just before it, one
# "FAILED: ..." line per reason the run failed (failed tests, a test binary killed by a signal,
# a compile error, any other non-zero exit of cargo).
#
# Then the Python package: its wheel is built with maturin (`maturin build --release`) into
# python/.venv (maturin, pytest and fasteners from PyPI, pinned in python/requirements.txt),
# installed there, and python/tests run with pytest against the installed package. pytest's
# passed/failed counts are added to the summary line, and a pytest failure fails the run.
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
# The Python package (python/): build the wheel, install it into its own venv, run pytest there.
pylog=$(mktemp)
trap 'rm -f "$log" "$pylog"' EXIT
pystatus=0
{
    if ! python/.venv/bin/python -c 'import maturin, pytest, fasteners' >/dev/null 2>&1; then
        python3 -m venv python/.venv
        python/.venv/bin/pip install --quiet --disable-pip-version-check -r python/requirements.txt
    fi
    rm -rf python/target/wheels
    python/.venv/bin/maturin build --release --locked -m python/Cargo.toml -i python/.venv/bin/python \
        --out python/target/wheels
    python/.venv/bin/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps python/target/wheels/buildlock-*.whl
    # From the repository root, so `import buildlock` finds the installed package, not python/buildlock.
    python/.venv/bin/pytest -p no:cacheprovider python/tests
} 2>&1 | tee "$pylog" || pystatus=${PIPESTATUS[0]}
echo
# Why the run failed, from cargo's own words.
grep -E '^error(\[E[0-9]+\])?: ' "$log" | grep -vE '^error: (test failed|[0-9]+ targets? failed)' | sort -u | sed 's/^/FAILED: cargo: /' || true
grep -E '^    `-p .*`$' "$log" | sed -E 's/^ *`(.*)`$/FAILED: test target \1/' || true
grep -E 'process didn.t exit successfully: .*\(signal: ' "$log" | sed -E 's/^.*successfully: `([^ `]*)[^(]*\((signal: [^)]*)\).*$/FAILED: test binary \1 killed (\2)/' || true
grep -E '^test result: FAILED' "$log" >/dev/null && echo "FAILED: some tests failed (see \"failures:\" above)"
if [ "$status" -ne 0 ]; then
    echo "FAILED: cargo test exited with status $status"
fi

if [ "$pystatus" -ne 0 ]; then
    echo "FAILED: Python package (wheel build or pytest) exited with status $pystatus"
    [ "$status" -ne 0 ] || status=$pystatus
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { print p + 0, f + 0, g + 0 }' "$log" >"$log.cargo"
# pytest's last line: "== 30 passed, 1 failed, 2 skipped in 8.1s ==" (any of the counts may be missing).
pyline=$(grep -E '^=+ .*(passed|failed|error|no tests ran).* in [0-9.]+s' "$pylog" | tail -n 1 || true)
read -r p f g <"$log.cargo"
rm -f "$log.cargo"
count() { echo "$pyline" | { grep -oE "[0-9]+ ($1)" || true; } | awk '{ s += $1 } END { print s + 0 }'; }
pp=$(count passed)
pf=$(count 'failed|errors?')
pg=$(count skipped)
if [ -z "$pyline" ] && [ "$pystatus" -ne 0 ]; then
    pf=1 # the wheel did not build, or pytest did not get to report: count the run as a failure
fi
echo "tests: $((p + pp)) passed, $((f + pf)) failed, $((g + pg)) ignored"
exit "$status"
