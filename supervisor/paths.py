"""User ids, the shard function, workspace paths, stable uids and directory ownership.

Layout under the workspace root (a volume shared by every pod)::

    <root>/shard-<N>/<user>          the user's workspace (uid:gid, 0700)
    <root>/shard-<N>/.home/<user>    the user's home (uid:gid, 0700)
    <root>/.uids/<uid>               claim file: the user id that owns <uid> (root only)

User ids cannot start with '.', so ``.home`` and ``.uids`` never collide with one. Confinement
comes from the kernel (own uid, 0700 directories), and every directory is created or chowned
through file descriptors opened with ``O_NOFOLLOW`` from the root, so a symlink planted where a
directory belongs is refused instead of followed. The root itself is the operator's: it may be a
symlink, and it must exist (a missing volume mount must not silently become ephemeral storage).
A crash while claiming a uid may leave a ``<root>/.uids/.claim-*`` temporary file; it is harmless.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from supervisor.errors import InvalidUserId, UidExhausted, UnsafePath

__all__ = [
    "MAX_USER_ID_LENGTH",
    "UserPaths",
    "ensure_private_dir",
    "ensure_user_dirs",
    "open_daemon_dir",
    "resolve_uid",
    "shard_of",
    "uid_owner",
    "user_paths",
    "validate_user_id",
]

MAX_USER_ID_LENGTH = 63
_USER_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SHOWN = 64  # characters of a rejected input quoted in the error message
_SHARD_MODE = 0o711  # root-owned: users may traverse to their own directory, not list others
_USER_MODE = 0o700
_UIDS_DIR = ".uids"
_HOME_DIR = ".home"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR_FLAGS | os.O_NOFOLLOW


# -- pure: ids, shards, paths ------------------------------------------------------------------


def validate_user_id(user: object) -> str:
    """Return ``user`` as a plain str if it is 1-63 of ``a-z 0-9 -``, not starting or ending with '-'.

    Raises :class:`InvalidUserId` naming the input safely (ASCII repr, truncated) otherwise.
    """
    if not isinstance(user, str):
        kind = type(user).__name__[:_SHOWN]
        raise InvalidUserId(f"invalid user id: expected a string, got {kind}")
    text = str.__str__(user)  # a plain str even for subclasses
    if _USER_ID.fullmatch(text):
        return text
    raise InvalidUserId(f"invalid user id {_quote(text)}: {_why_invalid(text)}")


def _quote(text: str) -> str:
    return ascii(text[:_SHOWN]) + ("..." if len(text) > _SHOWN else "")


def _why_invalid(text: str) -> str:
    if not text:
        return "it is empty"
    if len(text) > MAX_USER_ID_LENGTH:
        return f"it is {len(text)} characters long, the most is {MAX_USER_ID_LENGTH}"
    for char in text:
        if not ("a" <= char <= "z" or "0" <= char <= "9" or char == "-"):
            return f"character {ascii(char)} is not allowed"
    return "it starts or ends with '-'"


def _hash64(user: str) -> int:
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big")


def shard_of(user: str, shards: int) -> int:
    """The user's shard: first 8 bytes of sha256(user), big-endian, modulo ``shards`` (a contract)."""
    _check_shards(shards)
    return _hash64(validate_user_id(user)) % shards


def _check_shards(shards: int) -> None:
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a whole number >= 1, not {shards!r}")


@dataclass(frozen=True)
class UserPaths:
    """Where one user's directories live (made by :func:`user_paths`)."""

    user: str
    shard: int
    workspace: Path
    home: Path


def user_paths(root: Path, shards: int, user: str) -> UserPaths:
    """``<root>/shard-<N>/<user>`` and ``<root>/shard-<N>/.home/<user>``; pure, validates ``user``."""
    user = validate_user_id(user)
    shard = shard_of(user, shards)
    shard_dir = Path(root) / f"shard-{shard}"
    return UserPaths(user=user, shard=shard, workspace=shard_dir / user, home=shard_dir / _HOME_DIR / user)


# -- uids ----------------------------------------------------------------------------------------


def resolve_uid(root: Path, shards: int, user: str, uid_min: int, uid_max: int) -> int:
    """The user's uid, the same on every pod sharing ``root``.

    If the workspace exists, its owner is authoritative (a root-owned workspace was never handed
    over and counts as missing). Otherwise the uid comes from the claim files ``<root>/.uids/<uid>``:
    slots are probed in one deterministic order per user (from ``uid_min + hash % size``, linearly,
    wrapping) and the first slot that is free or already names the user is theirs. A claim is
    created by ``os.link``-ing a complete temporary file onto the slot name, which fails if the
    name exists, so two pods (or processes) never take the same slot, and a reader never sees a
    partial claim. Slots are only ever filled, never emptied or reassigned, so every allocator for
    one user passes the same filled slots and stops at the same one: concurrent admissions of the
    same user on different pods converge on one uid. (An ``EEXIST`` from a retried NFS link whose
    first try succeeded is also handled: the slot then names the user.)

    An authoritative owner inside the range is recorded as that uid's claim if it has none, so no
    new user is given it; if another user already claims it, :class:`UnsafePath` (``uid_conflict``).
    Raises :class:`UidExhausted` when every slot in ``[uid_min, uid_max]`` names another user,
    :class:`UnsafePath` if the workspace or its shard directory is a symlink or not a directory.
    """
    paths = user_paths(root, shards, user)
    if isinstance(uid_min, bool) or isinstance(uid_max, bool) or not 1 <= uid_min <= uid_max:
        raise ValueError(f"need 1 <= uid_min <= uid_max, got {uid_min!r}, {uid_max!r}")
    with _open_root(Path(root)) as root_fd:
        owner = _workspace_owner(root_fd, paths)
        if owner is not None and not uid_min <= owner <= uid_max:
            return owner  # outside the range no allocation can collide with it
        with _ensure_uids_dir(root_fd, Path(root)) as uids_fd:
            if owner is not None:
                _adopt(uids_fd, owner, paths)
                return owner
            return _allocate(uids_fd, paths.user, uid_min, uid_max)


def uid_owner(root: Path, uid: int) -> str | None:
    """The text of ``uid``'s claim (the user id owning it), or None if nobody has claimed it."""
    if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
        raise ValueError(f"not a uid: {uid!r}")
    with _open_root(Path(root)) as root_fd:
        try:
            uids_fd = os.open(_UIDS_DIR, _NOFOLLOW_DIR, dir_fd=root_fd)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise _unsafe(root_fd, _UIDS_DIR, Path(root) / _UIDS_DIR) from None
        with _closing(uids_fd):
            return _read_claim(uids_fd, str(uid))


def _workspace_owner(root_fd: int, paths: UserPaths) -> int | None:
    try:
        shard_fd = os.open(paths.workspace.parent.name, _NOFOLLOW_DIR, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise _unsafe(root_fd, paths.workspace.parent.name, paths.workspace.parent) from None
    with _closing(shard_fd):
        try:
            st = os.stat(paths.user, dir_fd=shard_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            raise _unsafe(shard_fd, paths.user, paths.workspace)
        return st.st_uid or None


def _adopt(uids_fd: int, uid: int, paths: UserPaths) -> None:
    """Record a claim for a workspace owner found on disk, so that no new user is given its uid."""
    holder = _read_claim(uids_fd, str(uid))
    if holder is None:
        holder = paths.user if _try_claim(uids_fd, uid, paths.user) else _read_claim(uids_fd, str(uid))
    if holder != paths.user:
        raise UnsafePath(
            f"workspace {paths.workspace} is owned by uid {uid}, which is claimed by user "
            f"{_quote(holder or '')}",
            reason="uid_conflict",
            hint=f"two users share uid {uid}: chown one workspace to its owner's claimed uid by hand",
        )


def _allocate(uids_fd: int, user: str, uid_min: int, uid_max: int) -> int:
    size = uid_max - uid_min + 1
    start = _hash64(user) % size
    temp: str | None = None
    try:
        for step in range(size):
            uid = uid_min + (start + step) % size
            holder = _read_claim(uids_fd, str(uid))
            if holder is None:
                if temp is None:
                    temp = _write_temp_claim(uids_fd, user)
                if _link_claim(uids_fd, temp, uid):
                    return uid
                holder = _read_claim(uids_fd, str(uid))
            if holder == user:
                return uid
    finally:
        if temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=uids_fd)
    raise UidExhausted(f"no free uid in [{uid_min}, {uid_max}] for user {user!r}: all {size} are claimed")


def _try_claim(uids_fd: int, uid: int, user: str) -> bool:
    temp = _write_temp_claim(uids_fd, user)
    try:
        return _link_claim(uids_fd, temp, uid)
    finally:
        os.unlink(temp, dir_fd=uids_fd)


def _write_temp_claim(uids_fd: int, user: str) -> str:
    name = f".claim-{os.getpid()}-{secrets.token_hex(8)}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=uids_fd)
    with _closing(fd):
        os.write(fd, f"{user}\n".encode())
        os.fsync(fd)
    return name


def _link_claim(uids_fd: int, temp: str, uid: int) -> bool:
    """Give ``temp``'s complete content the name ``uid``; False if the name is taken."""
    try:
        os.link(temp, str(uid), src_dir_fd=uids_fd, dst_dir_fd=uids_fd, follow_symlinks=False)
    except FileExistsError:
        return False
    os.fsync(uids_fd)
    return True


def _read_claim(uids_fd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=uids_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink where a claim belongs: taken, by nobody valid
            return "?"
        raise
    with _closing(fd):
        try:
            return os.read(fd, 256).decode("utf-8", "replace").strip()
        except IsADirectoryError:  # junk where a claim belongs: taken, by nobody valid
            return "?"


def _ensure_uids_dir(root_fd: int, root: Path) -> contextlib.AbstractContextManager[int]:
    return _closing(_ensure_dir(root_fd, _UIDS_DIR, root / _UIDS_DIR, owner=None, mode=0o700))


# -- directories -----------------------------------------------------------------------------------


def ensure_user_dirs(paths: UserPaths, root: Path, uid: int, gid: int) -> None:
    """Create (or repair) the shard directory, the workspace and the home, never following a symlink.

    The shard and ``.home`` directories are root-owned 0711; the workspace and the home are
    ``uid:gid`` 0700. Existing directories get their owner and mode fixed; their contents are
    not touched. Raises :class:`UnsafePath` naming any component that is a symlink or not a
    directory.
    """
    user = validate_user_id(paths.user)
    root = Path(root)
    shard_name = f"shard-{paths.shard}"
    if (
        isinstance(paths.shard, bool)
        or not isinstance(paths.shard, int)
        or paths.shard < 0
        or paths.workspace != root / shard_name / user
        or paths.home != root / shard_name / _HOME_DIR / user
    ):
        raise ValueError(f"{paths} does not describe a user's directories under {root}")
    _check_ids(uid, gid)
    with contextlib.ExitStack() as stack:
        root_fd = stack.enter_context(_open_root(root))
        shard_fd = stack.enter_context(_closing(_ensure_dir(root_fd, shard_name, root / shard_name, (0, 0), _SHARD_MODE)))
        os.close(_ensure_dir(shard_fd, user, paths.workspace, (uid, gid), _USER_MODE))
        homes_fd = stack.enter_context(_closing(_ensure_dir(shard_fd, _HOME_DIR, paths.home.parent, (0, 0), _SHARD_MODE)))
        os.close(_ensure_dir(homes_fd, user, paths.home, (uid, gid), _USER_MODE))


def ensure_private_dir(path: Path, uid: int, gid: int, mode: int = 0o700) -> None:
    """Create (or repair) ``path`` as a ``uid:gid`` directory with ``mode``, refusing a symlink there.

    Missing parents are created 0755 (root-owned when the daemon runs as root); existing parents
    are the operator's and may be symlinks. Raises :class:`UnsafePath` if ``path`` is a symlink or
    not a directory, or a parent is not a directory.
    """
    _check_ids(uid, gid)
    os.close(_open_private_dir(Path(path), (uid, gid), mode))


def open_daemon_dir(path: Path, mode: int = 0o700) -> int:
    """Like :func:`ensure_private_dir` for a directory of the daemon's own (its uid and gid, e.g.
    root 0700); returns the open directory fd (the caller closes it)."""
    return _open_private_dir(Path(path), (os.geteuid(), os.getegid()), mode)


def _open_private_dir(path: Path, owner: tuple[int, int], mode: int) -> int:
    if not path.is_absolute() or ".." in path.parts or path == Path(path.anchor):
        raise ValueError(f"need an absolute path without '..' below '/', not {str(path)!r}")
    with contextlib.ExitStack() as stack:
        fd = stack.enter_context(_closing(os.open(path.anchor, _DIR_FLAGS)))
        for depth, name in enumerate(path.parent.parts[1:], start=2):
            fd = stack.enter_context(_closing(_open_parent(fd, name, Path(*path.parts[:depth]))))
        return _ensure_dir(fd, path.name, path, owner, mode)


def _open_parent(dir_fd: int, name: str, where: Path) -> int:
    """Open an existing parent (following symlinks) or create it 0755, whatever the umask."""
    created = False
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            created = _mkdir(dir_fd, name, 0o755)
            fd = os.open(name, _NOFOLLOW_DIR if created else _DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError:
        raise _unsafe(dir_fd, name, where) from None
    if created:
        os.fchmod(fd, 0o755)
    return fd


def _check_ids(uid: int, gid: int) -> None:
    if isinstance(uid, bool) or not isinstance(uid, int) or uid < 1:
        raise ValueError(f"a user directory needs a uid >= 1 (never root), not {uid!r}")
    if isinstance(gid, bool) or not isinstance(gid, int) or gid < 0:
        raise ValueError(f"gid must be >= 0, not {gid!r}")


def _open_root(root: Path) -> contextlib.AbstractContextManager[int]:
    try:
        return _closing(os.open(root, _DIR_FLAGS))
    except (FileNotFoundError, NotADirectoryError):
        raise UnsafePath(
            f"workspace root {root} does not exist or is not a directory",
            reason="workspace_root_missing",
            hint="mount the shared workspace volume there (or create the directory) and restart",
        ) from None


def _mkdir(dir_fd: int, name: str, mode: int) -> bool:
    """``mkdir`` relative to ``dir_fd``; False if the name exists (as anything, even a symlink)."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        return False
    return True


def _ensure_dir(dir_fd: int, name: str, where: Path, owner: tuple[int, int] | None, mode: int) -> int:
    """Open ``name`` under ``dir_fd`` (creating it) without following a symlink; fix owner and mode.

    ``owner=None`` leaves the owner alone. Returns the open directory fd.
    """
    _mkdir(dir_fd, name, mode)
    try:
        fd = os.open(name, _NOFOLLOW_DIR, dir_fd=dir_fd)
    except NotADirectoryError:  # also what O_DIRECTORY|O_NOFOLLOW gives for a symlink on Linux
        raise _unsafe(dir_fd, name, where) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe(dir_fd, name, where) from None
        raise
    try:
        st = os.fstat(fd)
        chowned = owner is not None and (st.st_uid, st.st_gid) != owner
        if chowned:
            assert owner is not None
            os.fchown(fd, *owner)
        if chowned or stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)  # after fchown, which may clear set-id bits
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unsafe(dir_fd: int, name: str, where: Path) -> UnsafePath:
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    what = "a symlink; refusing to follow it" if is_link else "not a directory"
    return UnsafePath(f"{where} is {what}")


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)
