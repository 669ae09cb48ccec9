"""What the daemon remembers about each user across its own restarts.

One small JSON file per user under ``<state_dir>/users/``, replaced atomically (write + rename) on
every change, so a change costs O(1) whatever the number of users. No fsync: the records only
matter while the users' processes are alive, and those do not survive a kernel crash either.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisor.paths import validate_user_id

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


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

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def save(self, record: UserRecord) -> None:
        data = json.dumps({"version": SCHEMA_VERSION, **asdict(record)}).encode()
        final = self.dir / f"{record.user}.json"
        tmp = self.dir / f".{record.user}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, final)

    def delete(self, user: str) -> None:
        try:
            (self.dir / f"{user}.json").unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> list[UserRecord]:
        """Every readable record; unreadable or foreign files are logged and skipped, never fatal."""
        records: list[UserRecord] = []
        if not self.dir.is_dir():
            return records
        for path in sorted(self.dir.glob("*.json")):
            try:
                raw = json.loads(path.read_bytes())
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
