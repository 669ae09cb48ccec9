"""What the daemon remembers about each user across its own restarts.

One small JSON file per user under ``<state_dir>/users/``, replaced atomically (write + rename) on
every change, so a change costs O(1) whatever the number of users. No fsync: the records only
matter while the users' processes are alive, and those do not survive a kernel crash either.

A save that fails (ENOSPC, EIO, something odd at the path) raises nothing: the last good file
stays, the user is listed in :attr:`StateStore.failing` (logged once per new error) and the next
save retries. Files are opened without following symlinks, never block on a FIFO and are read
with a size limit, so nothing found in the directory can hang or crash the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from supervisor.paths import validate_user_id

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024  # a record is ~300 bytes; anything larger is not one of ours


@dataclass(frozen=True)
class UserRecord:
    user: str
    tier: str
    uid: int
    gid: int
    state: str
    pid: int | None
    pid_start: int | None  # kernel start time of pid, to tell it from a reused pid
    restarts: int
    running_since_wall: float | None  # time.time() when it became RUNNING
    started_wall: float | None
    reason: str = ""


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "users"
        #: Users whose latest record is not on disk, with the error; retried on their next save.
        self.failing: dict[str, str] = {}

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def save(self, record: UserRecord) -> bool:
        """Write ``record`` atomically; False (logged, last good file kept) when the write failed."""
        data = json.dumps({"version": SCHEMA_VERSION, **asdict(record)}).encode()
        return self._attempt(record.user, "save", lambda: self._write(record.user, data))

    def delete(self, user: str) -> bool:
        return self._attempt(user, "delete", lambda: _unlink(self.dir / f"{user}.json"))

    def _attempt(self, user: str, what: str, change: Callable[[], None]) -> bool:
        try:
            change()
        except OSError as exc:
            error = f"cannot {what} {self.dir / f'{user}.json'}: {exc}"
            if self.failing.get(user) != error:
                log.error("user=%s %s (the last good state file is kept; retried on the next save)", user, error)
            self.failing[user] = error
            return False
        if self.failing.pop(user, None) is not None:
            log.info("user=%s state file written again", user)
        return True

    def _write(self, user: str, data: bytes) -> None:
        tmp = self.dir / f".{user}.json.tmp"
        _unlink(tmp)  # whatever is there (a FIFO would block an open for writing)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.close(fd)
            fd = -1
            os.replace(tmp, self.dir / f"{user}.json")
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):  # a partial file must not hold the space of a full disk
                tmp.unlink()
            raise

    def load_all(self) -> list[UserRecord]:
        """Every readable record; unreadable or foreign files are logged and skipped, never fatal."""
        records: list[UserRecord] = []
        if not self.dir.is_dir():
            return records
        for path in sorted(self.dir.glob("*.json")):
            try:
                raw = json.loads(_read_regular(path, MAX_RECORD_BYTES))
                if raw.pop("version", None) != SCHEMA_VERSION:
                    raise ValueError("unknown schema version")
                record = UserRecord(**raw)
                validate_user_id(record.user)
                if path.stem != record.user:
                    raise ValueError("file name does not match the user")
            except Exception as exc:  # noqa: BLE001 - a bad file must not stop the daemon
                log.warning("ignoring unreadable state file %s: %s", path, exc)
                continue
            records.append(record)
        return records


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _read_regular(path: Path, limit: int) -> bytes:
    """The contents of ``path`` if it is a regular file (not a symlink, FIFO, device...) of at
    most ``limit`` bytes; OSError or ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise ValueError(f"larger than {limit} bytes")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)
