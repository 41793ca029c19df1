"""The exceptions buildlock raises (the extension raises these classes)."""

from __future__ import annotations


class Error(Exception):
    """Anything that went wrong with a buildlock lock; the message says what and what to do."""


class Timeout(Error, TimeoutError):
    """The lock was busy (a non-blocking attempt) or the wait ran out; the message names the holder."""


class LockLost(Error):
    """A held lock was lost (its lock file deleted or replaced): another holder may have run too."""
