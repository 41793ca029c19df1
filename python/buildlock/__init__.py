"""buildlock: locks for build tools that survive killed builds.

    import buildlock
    with buildlock.Lock("libfastled_build", operation="build", timeout=300):
        build()

The locks are the Rust library's (the same daemon, on-disk protocol and guarantees as the
`buildlock-client` command), not a second implementation. See `Lock`, `AsyncLock`, `status` and
`break_lock`, and README.md for how the daemon is found.
"""

from __future__ import annotations

import os
import sys
import sysconfig

# asyncio, threading and typing are imported only where they are used (type checkers see this
# as typing.TYPE_CHECKING): asyncio alone would add about 8 MB and 90 mappings to every process
# that imports buildlock, and a killed process's memory is torn down before the kernel frees
# its locks, so a killed holder would free its lock later.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from typing import Any, Optional

from ._errors import Error, LockLost, Timeout
from ._buildlock import Lock, break_lock, status

__all__ = ["Lock", "AsyncLock", "status", "break_lock", "Error", "Timeout", "LockLost", "daemon_command"]


def daemon_command() -> Optional[str]:
    """The `buildlockd` command this package installed (a console script running the daemon
    inside the extension), if it is there."""
    for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if scripts:
            path = os.path.join(scripts, "buildlockd")
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


# The library starts the daemon on demand by running `$BUILDLOCKD`: unless the caller chose one,
# make it this package's own, so no separate install is needed.
if not os.environ.get("BUILDLOCKD"):
    _daemon = daemon_command()
    if _daemon is not None:
        os.environ["BUILDLOCKD"] = _daemon


class AsyncLock:
    """`Lock` for asyncio: `async with buildlock.AsyncLock(...)` waits in a worker thread, so the
    event loop keeps running; cancelling the waiting task ends the wait, and once the
    cancellation is through nothing is held (a lock granted meanwhile is released). Takes the
    same arguments as `Lock`."""

    def __init__(self, name_or_path: "str | os.PathLike[str]", **kwargs: Any) -> None:
        self._lock = Lock(name_or_path, **kwargs)

    @property
    def lock(self) -> Lock:
        """The underlying `Lock` (token, check, path)."""
        return self._lock

    @property
    def token(self) -> Optional[int]:
        return self._lock.token

    async def acquire(self, timeout: Optional[float] = None) -> bool:
        import asyncio
        import threading

        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, lambda: self._lock.acquire(True, timeout, cancel))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancel.set()

            def undo(f: "asyncio.Future[bool]") -> None:
                # Granted just before the cancellation was seen: give it back.
                if not f.cancelled() and f.exception() is None and f.result():
                    self._lock.release()

            # The wait ends within milliseconds of `cancel`; awaiting it means nothing is held
            # once the cancellation is through (unless this await is cancelled too).
            try:
                await asyncio.wait({fut})
            finally:
                if fut.done():
                    undo(fut)
                else:
                    fut.add_done_callback(undo)
            raise

    async def release(self) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self._lock.release)

    async def __aenter__(self) -> "AsyncLock":
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
