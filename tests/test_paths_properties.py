"""Properties of user-id validation and the workspace layout, for arbitrary input."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.errors import InvalidUserId
from supervisor.paths import user_paths, validate_user_id

SETTINGS = settings(database=None, deadline=None, max_examples=300)

VALID_ID = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
TRICKY_TEXT = st.text(alphabet="az09-._/\\\x00\n AZé" + "\u0131\u212a\uff41\u0661", max_size=70)
ANY_TEXT = st.one_of(st.text(), st.text(max_size=80), TRICKY_TEXT, VALID_ID)
ALLOWED = set(string.ascii_lowercase + string.digits + "-")


def reference_is_valid(text: str) -> bool:
    """The rule written out without a regex."""
    return 1 <= len(text) <= 63 and set(text) <= ALLOWED and text[0] != "-" and text[-1] != "-"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@SETTINGS
@given(user=ANY_TEXT, shards=st.integers(1, 1000))
def test_paths_are_strictly_inside_the_root_or_the_id_is_rejected(root: Path, user: str, shards: int) -> None:
    try:
        paths = user_paths(root, shards, user)
    except InvalidUserId as exc:
        assert not reference_is_valid(user)
        assert str(exc).isascii() and str(exc).isprintable()
        return
    assert reference_is_valid(user)
    real_root = root.resolve()
    for path in (paths.workspace, paths.home):
        real = path.resolve()
        assert real.is_relative_to(real_root) and real != real_root
        assert real.name == user and real.parent.parent in (real_root, real_root / f"shard-{paths.shard}")
    assert 0 <= paths.shard < shards


@SETTINGS
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(VALID_ID, max_size=2)))
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(InvalidUserId):
        validate_user_id(value)


@SETTINGS
@given(a=VALID_ID, b=VALID_ID, shards=st.integers(1, 20))
def test_distinct_users_never_share_a_directory(root: Path, a: str, b: str, shards: int) -> None:
    if a == b:
        return
    pa, pb = user_paths(root, shards, a), user_paths(root, shards, b)
    dirs_a = [pa.workspace.resolve(), pa.home.resolve()]
    dirs_b = [pb.workspace.resolve(), pb.home.resolve()]
    assert not dirs_a[0].is_relative_to(dirs_a[1]) and not dirs_a[1].is_relative_to(dirs_a[0])
    for x in dirs_a:
        for y in dirs_b:
            assert not x.is_relative_to(y) and not y.is_relative_to(x)
