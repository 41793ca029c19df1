"""Type stubs for the extension module (re-exported by `buildlock`)."""

import os
import threading
from types import TracebackType
from typing import List, Literal, Optional, Type, TypedDict, Union

class Holder(TypedDict):
    pid: Optional[int]
    command: Optional[str]
    host: Optional[str]
    since: Optional[str]
    operation: Optional[str]
    mode: Optional[str]
    token: Optional[int]
    description: str

class Waiter(TypedDict):
    pid: int
    mode: str
    waited: float
    operation: str

class LockStatus(TypedDict):
    name: str
    path: str
    state: str
    kind: str
    detail: str
    holder: Optional[Holder]
    waiters: List[Waiter]

class Lock:
    """A buildlock lock. Re-entrant per object: the thread holding it may acquire it again
    (counted); other threads of the process wait for it, then take it from the OS or daemon.
    A forked child never releases or uses a lease its parent acquired (it raises `Error`)."""

    def __init__(
        self,
        name_or_path: Union[str, "os.PathLike[str]"],
        shared: bool = False,
        timeout: Optional[float] = None,
        operation: str = "",
        mode: Literal["auto", "daemon", "direct"] = "auto",
        lock_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        soft: bool = False,
        stale_after: Optional[float] = None,
        backend: Optional[str] = None,
        remote_timeout: Optional[float] = None,
    ) -> None:
        """`backend`: a `postgres://` URL (the lock, by name, lives on that server) or "local";
        default `$BUILDLOCK_BACKEND`, else the config file's first matching `[[locks]]` entry."""
    def acquire(
        self, blocking: bool = True, timeout: Optional[float] = None, _cancel: Optional[threading.Event] = None
    ) -> bool:
        """True once held. With `blocking=False`, False if the lock is busy. Raises `Timeout`
        (naming the holder) when `timeout` (else the constructor's) runs out; KeyboardInterrupt
        ends a wait."""
    def release(self) -> None: ...
    def check(self) -> None:
        """Raises `LockLost` if the lock was lost while held."""
    @property
    def token(self) -> Optional[int]:
        """The fencing token of the held lease (grows with every holder), else None."""
    @property
    def is_locked(self) -> bool: ...
    @property
    def via_daemon(self) -> Optional[bool]: ...
    @property
    def path(self) -> str: ...
    @property
    def backend(self) -> Optional[str]:
        """The server the lock lives on (`postgres://host:port/db`, never a password), or None."""
    def __enter__(self) -> "Lock": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

def status(
    name_or_path: Optional[str] = None,
    lock_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    mode: Literal["auto", "daemon", "direct"] = "auto",
    soft: bool = False,
    stale_after: Optional[float] = None,
    backend: Optional[str] = None,
) -> List[LockStatus]:
    """Every lock, or the one named (a list of one), as the command line's `status` lists them:
    with `backend` (else `$BUILDLOCK_BACKEND`), the locks on that server; else those on the
    servers the config file's `[[locks]]` entries name, then the lock directory's. A remote
    lock's `kind` is "remote" and its `path` reads `NAME on postgres://host:port/db`; its holder
    and waiters come from the server, on any host."""

def break_lock(
    name_or_path: str,
    lock_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    soft: bool = False,
    stale_after: Optional[float] = None,
) -> str:
    """Removes a stale lock and says what was done; raises `Error` if a live holder has it."""

def cli_main(argv: List[str], self_command: List[str]) -> int: ...
def daemon_main(argv: List[str]) -> int: ...
