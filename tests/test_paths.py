"""supervisor.paths against the real filesystem: ids, shards, uid claims, safe directory creation."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.errors import InvalidUserId, UidExhausted, UnsafePath
from supervisor.paths import (
    UserPaths,
    ensure_private_dir,
    ensure_user_dirs,
    resolve_uid,
    shard_of,
    uid_owner,
    user_paths,
    validate_user_id,
)
from conftest import needs_root

REPO = Path(__file__).resolve().parents[1]
UID, GID = 2_000_123, 2_000_456
OTHER_UID = 2_000_999

# -- user ids ------------------------------------------------------------------------------------

VALID = ["a", "0", "z-9", "a-b-c", "a--b", "9lives", "user-42", "x" * 63]
INVALID: list[object] = [
    "", "-", "-a", "a-", "A", "Alice", "a.b", ".home", ".", "..", "a/b", "../etc", "/etc",
    "a\x00b", "\x00", "a b", " a", "a\n", "\n", "a\t", "ä", "é", "ｆｕｌｌ", "١٢", "a\u200bb",
    "x" * 64, "a" * 1000, "a_b", "a:b", "a@b", "a\\b", "*",
    42, None, b"alice", ["alice"], 1.5, object(),
]  # fmt: skip


@pytest.mark.parametrize("user", VALID)
def test_valid_user_ids_are_accepted(user: str) -> None:
    assert validate_user_id(user) == user


@pytest.mark.parametrize("user", INVALID, ids=lambda v: ascii(v)[:20])
def test_invalid_user_ids_are_rejected(user: object) -> None:
    with pytest.raises(InvalidUserId) as info:
        validate_user_id(user)
    message = str(info.value)
    assert info.value.reason == "invalid_user_id"
    assert message.isascii() and message.isprintable()
    assert len(message) < 400


def test_rejection_message_names_the_input_truncated() -> None:
    with pytest.raises(InvalidUserId, match=r"'Alice'.*'A' is not allowed"):
        validate_user_id("Alice")
    with pytest.raises(InvalidUserId, match=r"\\x00"):
        validate_user_id("a\x00b")
    with pytest.raises(InvalidUserId) as info:
        validate_user_id("y" * 10_000)
    assert "y" * 64 + "'..." in info.value.message and "y" * 65 not in info.value.message
    assert "10000 characters" in info.value.message
    with pytest.raises(InvalidUserId, match="got bytes"):
        validate_user_id(b"alice")


def test_str_subclass_comes_back_as_plain_str() -> None:
    class Name(str):
        pass

    result = validate_user_id(Name("alice"))
    assert type(result) is str and result == "alice"


# -- shards and paths ----------------------------------------------------------------------------

# Computed once with int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % shards.
SHARD_VECTORS = [
    ("alice", 10, 7), ("alice", 7, 1), ("alice", 1_000_000, 220207),
    ("bob", 10, 0), ("bob", 7, 1), ("bob", 1_000_000, 178650),
    ("a", 10, 0), ("a", 7, 4), ("a", 1_000_000, 962250),
    ("user-42", 10, 9), ("user-42", 7, 2), ("user-42", 1_000_000, 5129),
    ("x" * 63, 10, 6), ("x" * 63, 7, 5), ("x" * 63, 1_000_000, 513126),
    ("alice", 1, 0),
]  # fmt: skip


@pytest.mark.parametrize(("user", "shards", "expected"), SHARD_VECTORS)
def test_shard_function_is_fixed(user: str, shards: int, expected: int) -> None:
    assert shard_of(user, shards) == expected


@pytest.mark.parametrize("shards", [0, -1, True])
def test_shard_count_must_be_positive(shards: int) -> None:
    with pytest.raises(ValueError):
        shard_of("alice", shards)


def test_user_paths_layout(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    assert paths == UserPaths(
        user="alice",
        shard=7,
        workspace=tmp_path / "shard-7" / "alice",
        home=tmp_path / "shard-7" / ".home" / "alice",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        paths.user = "bob"  # type: ignore[misc]
    assert list(tmp_path.iterdir()) == []  # pure


def test_user_paths_validates(tmp_path: Path) -> None:
    with pytest.raises(InvalidUserId):
        user_paths(tmp_path, 10, "../etc")


# -- uid claims ----------------------------------------------------------------------------------


def start_uid(user: str, uid_min: int, uid_max: int) -> int:
    import hashlib

    h = int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big")
    return uid_min + h % (uid_max - uid_min + 1)


def claims(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (root / ".uids").iterdir()}


def test_first_uid_is_the_hashed_slot_and_is_stable(tmp_path: Path) -> None:
    uid = resolve_uid(tmp_path, 10, "alice", 100_000, 199_999)
    assert uid == start_uid("alice", 100_000, 199_999)
    assert claims(tmp_path) == {str(uid): "alice\n"}  # no temporary file left behind
    assert resolve_uid(tmp_path, 10, "alice", 100_000, 199_999) == uid
    assert uid_owner(tmp_path, uid) == "alice"
    assert uid_owner(tmp_path, uid + 1) is None
    assert stat.S_IMODE((tmp_path / ".uids").stat().st_mode) == 0o700


def test_taken_slots_are_probed_linearly_with_wraparound(tmp_path: Path) -> None:
    lo, hi = 5000, 5004
    first = start_uid("alice", lo, hi)
    (tmp_path / ".uids").mkdir()
    taken = [lo + (first - lo + i) % 5 for i in range(3)]  # the next 3 slots, wrapping
    for i, uid in enumerate(taken):
        (tmp_path / ".uids" / str(uid)).write_text(f"other-{i}\n")
    uid = resolve_uid(tmp_path, 10, "alice", lo, hi)
    assert uid == lo + (first - lo + 3) % 5
    assert uid_owner(tmp_path, uid) == "alice"


def test_existing_claim_for_the_user_is_found_behind_others(tmp_path: Path) -> None:
    lo, hi = 5000, 5009
    first = start_uid("alice", lo, hi)
    (tmp_path / ".uids").mkdir()
    (tmp_path / ".uids" / str(first)).write_text("bob\n")
    second = lo + (first - lo + 1) % 10
    (tmp_path / ".uids" / str(second)).write_text("alice\n")
    assert resolve_uid(tmp_path, 10, "alice", lo, hi) == second


def test_exhausted_range_raises_but_claimed_users_still_resolve(tmp_path: Path) -> None:
    users = ["u1", "u2", "u3"]
    uids = {user: resolve_uid(tmp_path, 10, user, 7000, 7002) for user in users}
    assert sorted(uids.values()) == [7000, 7001, 7002]
    with pytest.raises(UidExhausted) as info:
        resolve_uid(tmp_path, 10, "u4", 7000, 7002)
    assert info.value.reason == "uid_range_exhausted"
    assert {user: resolve_uid(tmp_path, 10, user, 7000, 7002) for user in users} == uids
    assert len(claims(tmp_path)) == 3  # the failed allocation left no temporary file


def test_junk_in_a_slot_counts_as_taken(tmp_path: Path) -> None:
    (tmp_path / ".uids").mkdir()
    (tmp_path / ".uids" / "7000").symlink_to("/etc/passwd")
    (tmp_path / ".uids" / "7001").mkdir()
    assert resolve_uid(tmp_path, 10, "alice", 7000, 7002) == 7002
    with pytest.raises(UidExhausted):
        resolve_uid(tmp_path, 10, "bob", 7000, 7002)


def test_invalid_input_touches_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidUserId):
        resolve_uid(tmp_path, 10, "Alice", 7000, 7002)
    with pytest.raises(ValueError):
        resolve_uid(tmp_path, 10, "alice", 7002, 7000)
    with pytest.raises(InvalidUserId):
        ensure_user_dirs(UserPaths("../x", 0, tmp_path / "shard-0" / "../x", tmp_path / "h"), tmp_path, UID, GID)
    assert list(tmp_path.iterdir()) == []


def test_missing_root_is_an_error_not_created(tmp_path: Path) -> None:
    root = tmp_path / "not-mounted"
    with pytest.raises(UnsafePath) as info:
        resolve_uid(root, 10, "alice", 7000, 7002)
    assert info.value.reason == "workspace_root_missing"
    assert not root.exists()


def test_symlinked_workspace_is_not_an_owner(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    paths.workspace.parent.mkdir()
    paths.workspace.symlink_to(decoy)
    with pytest.raises(UnsafePath, match="symlink"):
        resolve_uid(tmp_path, 10, "alice", 7000, 7002)


def test_symlinked_shard_dir_is_refused_when_resolving(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    decoy = tmp_path / "decoy"
    (decoy / "alice").mkdir(parents=True)
    paths.workspace.parent.symlink_to(decoy)
    with pytest.raises(UnsafePath, match="shard-7 is a symlink"):
        resolve_uid(tmp_path, 10, "alice", 7000, 7002)


def test_workspace_that_is_a_file_is_refused_when_resolving(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    paths.workspace.parent.mkdir()
    paths.workspace.write_text("")
    with pytest.raises(UnsafePath, match="not a directory"):
        resolve_uid(tmp_path, 10, "alice", 7000, 7002)


@needs_root
def test_existing_workspace_owner_is_authoritative(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    paths.workspace.mkdir(parents=True)
    os.chown(paths.workspace, 123_456, 123_456)  # outside the range: returned, nothing recorded
    assert resolve_uid(tmp_path, 10, "alice", 7000, 7002) == 123_456
    assert not (tmp_path / ".uids").exists()
    os.chown(paths.workspace, 7001, 7001)  # inside: returned and claimed, so nobody else gets it
    assert resolve_uid(tmp_path, 10, "alice", 7000, 7002) == 7001
    assert uid_owner(tmp_path, 7001) == "alice"
    others = {resolve_uid(tmp_path, 10, user, 7000, 7002) for user in ("bob", "carol")}
    assert others == {7000, 7002}


@needs_root
def test_workspace_owned_by_another_users_uid_is_a_conflict(tmp_path: Path) -> None:
    bob_uid = resolve_uid(tmp_path, 10, "bob", 7000, 7002)
    paths = user_paths(tmp_path, 10, "alice")
    paths.workspace.mkdir(parents=True)
    os.chown(paths.workspace, bob_uid, bob_uid)
    with pytest.raises(UnsafePath) as info:
        resolve_uid(tmp_path, 10, "alice", 7000, 7002)
    assert info.value.reason == "uid_conflict" and "'bob'" in info.value.message


@needs_root
def test_root_owned_workspace_was_never_handed_over(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    paths.workspace.mkdir(parents=True)  # as if a crash hit between mkdir and fchown
    uid = resolve_uid(tmp_path, 10, "alice", 7000, 7002)
    assert uid != 0 and uid_owner(tmp_path, uid) == "alice"


# -- concurrency: several processes on one root --------------------------------------------------

WORKER = """
import json, os, random, sys, time
from pathlib import Path
from supervisor.errors import UidExhausted
from supervisor.paths import resolve_uid
root, lo, hi, go, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
users = sys.argv[6:]
random.Random(seed).shuffle(users)
deadline = time.monotonic() + 30
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.001)
result = {}
for user in users:
    try:
        result[user] = resolve_uid(root, 10, user, lo, hi)
    except UidExhausted:
        result[user] = None
print(json.dumps(result))
"""


def run_workers(root: Path, uid_min: int, uid_max: int, per_worker: list[list[str]]) -> list[dict[str, int | None]]:
    """Start one process per user list, release them at once, return each one's {user: uid}."""
    go = root.parent / f"{root.name}.go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(uid_min), str(uid_max), str(go), str(seed), *users],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        for seed, users in enumerate(per_worker)
    ]
    time.sleep(0.3)  # let them reach the start line; correctness does not depend on it
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert [p for p in (root / ".uids").iterdir() if p.name.startswith(".")] == []
    return results


def test_concurrent_processes_give_unique_uids_and_agree_per_user(tmp_path: Path) -> None:
    users = [f"user-{i}" for i in range(40)]
    results = run_workers(tmp_path, 5000, 5047, [list(users) for _ in range(8)])  # 48 slots: crowded
    for result in results:
        assert result == results[0]
    uids = results[0]
    assert set(uids) == set(users)
    assert len(set(uids.values())) == len(users)
    assert all(uid is not None and 5000 <= uid <= 5047 for uid in uids.values())
    assert {name: text.strip() for name, text in claims(tmp_path).items()} == {str(u): user for user, u in uids.items()}


def test_concurrent_processes_admitting_the_same_user_converge(tmp_path: Path) -> None:
    (tmp_path / ".uids").mkdir()
    first = start_uid("alice", 5000, 5009)
    (tmp_path / ".uids" / str(first)).write_text("bob\n")  # make them probe past a taken slot
    results = run_workers(tmp_path, 5000, 5009, [["alice"] for _ in range(12)])
    assert {result["alice"] for result in results} == {5000 + (first - 5000 + 1) % 10}
    assert sorted(text for text in claims(tmp_path).values()) == ["alice\n", "bob\n"]


def test_concurrent_exhaustion_is_consistent(tmp_path: Path) -> None:
    users = [f"u{i}" for i in range(16)]
    results = run_workers(tmp_path, 6000, 6009, [list(users) for _ in range(6)])
    for result in results:
        assert result == results[0]
    granted = {user: uid for user, uid in results[0].items() if uid is not None}
    assert len(granted) == 10 and len(set(granted.values())) == 10


# -- directories ---------------------------------------------------------------------------------


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@needs_root
def test_ensure_user_dirs_creates_owned_private_dirs(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    ensure_user_dirs(paths, tmp_path, UID, GID)
    assert owner_mode(paths.workspace.parent) == (0, 0, 0o711)
    assert owner_mode(paths.home.parent) == (0, 0, 0o711)
    assert owner_mode(paths.workspace) == (UID, GID, 0o700)
    assert owner_mode(paths.home) == (UID, GID, 0o700)
    ensure_user_dirs(paths, tmp_path, UID, GID)  # idempotent
    assert owner_mode(paths.workspace) == (UID, GID, 0o700)


@needs_root
def test_ensure_user_dirs_repairs_owner_and_mode_without_recursing(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    paths.home.mkdir(parents=True)
    paths.workspace.mkdir()
    os.chmod(paths.workspace.parent, 0o777)
    os.chmod(paths.workspace, 0o2777)
    os.chown(paths.home, OTHER_UID, OTHER_UID)
    inner = paths.workspace / "project"
    inner.mkdir()
    os.chown(inner, OTHER_UID, OTHER_UID)
    os.chmod(inner, 0o755)
    ensure_user_dirs(paths, tmp_path, UID, GID)
    assert owner_mode(paths.workspace.parent) == (0, 0, 0o711)
    assert owner_mode(paths.workspace) == (UID, GID, 0o700)
    assert owner_mode(paths.home) == (UID, GID, 0o700)
    assert owner_mode(inner) == (OTHER_UID, OTHER_UID, 0o755)


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


@needs_root
@pytest.mark.parametrize("where", ["workspace", "home", "shard", "homes"])
def test_planted_symlink_is_refused_and_target_untouched(tmp_path: Path, where: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bob = user_paths(root, 10, "bob")
    ensure_user_dirs(bob, root, OTHER_UID, OTHER_UID)
    decoy = tmp_path / "decoy"  # stands in for /etc: root-owned, 0755
    decoy.mkdir(mode=0o755)
    os.chmod(decoy, 0o755)
    alice = user_paths(root, 10, "alice")
    link, target = {
        "workspace": (alice.workspace, bob.workspace),  # another user's directory
        "home": (alice.home, bob.home),
        "shard": (alice.workspace.parent, decoy),
        "homes": (alice.home.parent, decoy),
    }[where]
    if where == "home":
        alice.workspace.mkdir(parents=True)
        alice.home.parent.mkdir(parents=True)
    plant(link, target)
    before = {p: owner_mode(p) for p in (target, *target.iterdir())}
    with pytest.raises(UnsafePath, match=f"{link.name} is a symlink"):
        ensure_user_dirs(alice, root, UID, GID)
    assert {p: owner_mode(p) for p in (target, *target.iterdir())} == before
    assert link.is_symlink()


@needs_root
def test_dangling_symlink_target_is_not_created(tmp_path: Path) -> None:
    paths = user_paths(tmp_path / "root", 10, "alice")
    plant(paths.workspace, tmp_path / "elsewhere")
    with pytest.raises(UnsafePath, match="symlink"):
        ensure_user_dirs(paths, tmp_path / "root", UID, GID)
    assert not (tmp_path / "elsewhere").exists()


@needs_root
def test_file_in_place_of_workspace_is_refused(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    paths.workspace.parent.mkdir()
    paths.workspace.write_text("x")
    with pytest.raises(UnsafePath, match="alice is not a directory"):
        ensure_user_dirs(paths, tmp_path, UID, GID)


def test_ensure_user_dirs_rejects_foreign_paths_and_root_uid(tmp_path: Path) -> None:
    paths = user_paths(tmp_path, 10, "alice")
    with pytest.raises(ValueError):
        ensure_user_dirs(paths, tmp_path / "other-root", UID, GID)
    with pytest.raises(ValueError):
        ensure_user_dirs(dataclasses.replace(paths, workspace=tmp_path / "etc"), tmp_path, UID, GID)
    with pytest.raises(ValueError):
        ensure_user_dirs(paths, tmp_path, 0, GID)
    assert list(tmp_path.iterdir()) == []


@needs_root
def test_ensure_private_dir_creates_parents_and_owned_leaf(tmp_path: Path) -> None:
    leaf = tmp_path / "run" / "users" / "alice"
    old = os.umask(0o077)
    try:
        ensure_private_dir(leaf, UID, GID)
    finally:
        os.umask(old)
    assert owner_mode(leaf.parent) == (0, os.getegid(), 0o755)
    assert owner_mode(leaf.parent.parent) == (0, os.getegid(), 0o755)
    assert owner_mode(leaf) == (UID, GID, 0o700)
    os.chmod(leaf, 0o777)
    ensure_private_dir(leaf, UID, GID, mode=0o750)
    assert owner_mode(leaf) == (UID, GID, 0o750)


@needs_root
def test_ensure_private_dir_refuses_symlinked_leaf(tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    os.chmod(decoy, 0o755)
    leaf = tmp_path / "run" / "alice"
    plant(leaf, decoy)
    with pytest.raises(UnsafePath, match="alice is a symlink"):
        ensure_private_dir(leaf, UID, GID)
    assert owner_mode(decoy) == (0, os.getegid(), 0o755)


def test_ensure_private_dir_rejects_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafePath, match="not a directory"):
        ensure_private_dir(tmp_path / "file" / "alice", UID, GID)
    for bad in (Path("relative/dir"), tmp_path / ".." / "x", Path("/")):
        with pytest.raises(ValueError):
            ensure_private_dir(bad, UID, GID)
