"""The `buildlock-client` and `buildlockd` commands of the Python package (console scripts).

Both run inside the extension module: `buildlock-client` is the Rust command line itself
(`buildlock_cli`), `buildlockd` the Rust daemon (`buildlockd::main_from`). No separate binary is
installed or needed.
"""

from __future__ import annotations

import os
import sys

from . import _buildlock


def client() -> None:
    script = os.path.abspath(sys.argv[0])
    # `acquire` starts a keeper by running this command line again: this interpreter and script.
    sys.exit(_buildlock.cli_main(["buildlock-client", *sys.argv[1:]], [sys.executable, script]))


def daemon() -> None:
    sys.exit(_buildlock.daemon_main(["buildlockd", *sys.argv[1:]]))
