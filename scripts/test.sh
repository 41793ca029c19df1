#!/usr/bin/env bash
# Runs the whole test suite. The interop tests drive the real Python `fasteners` package, so a
# virtual environment with it is made first (once) in .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c 'import fasteners' >/dev/null 2>&1; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt
fi
export BUILDLOCK_TEST_PYTHON="$PWD/.venv/bin/python"
exec cargo test --workspace --locked "$@"
