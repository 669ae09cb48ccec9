"""The daemon owns every user's IDE socket (supervisor.idesocket), on the real kernel, as root.

- :func:`idesocket.listen` makes the socket in a root-only directory, never through a symlink, and
  a new spawn's socket takes every new connection (a holder of the old descriptor gets none);
  leftovers of the user-owned layout are removed without following a symlink.
- The Theia preload adopts fd 3 with real node (no Theia build needed): served as the user, the
  peer credentials name the user, nothing of ``LISTEN_*`` left in the environment.
- With a real daemon and front door: a user who tries everything they can reach of the socket
  layout from their own uid cannot redirect the front door, and even killing their own IDE only
  brings their own IDE back; an IDE that never calls ``listen()`` itself is refused (502, counted).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from supervisor import idesocket
from supervisor.errors import UnsafePath
from tests.conftest import is_root
from tests.harness import SYSTEM_PYTHON, on_fd3, poll
from tests.test_frontdoor_daemon import FrontDoorDaemon, bearer, shared_dir  # noqa: F401 - shared_dir is a fixture

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root: root-owned socket directories and other uids")
PRELOAD = Path(__file__).resolve().parents[1] / "images" / "theia" / "unix-socket-preload.js"
NODE = shutil.which("node")


def peer(path: Path) -> tuple[int, int]:
    """(pid, uid) of whoever last listen()ed on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


# ---- the socket and its directory ------------------------------------------------------------------


def test_the_socket_is_made_in_a_root_only_directory_and_replaced_on_every_spawn(tmp_path: Path) -> None:
    with idesocket.listen(tmp_path, "alice") as old:
        directory = os.lstat(tmp_path / "ide")
        assert (directory.st_uid, directory.st_mode & 0o777) == (0, 0o700)
        with idesocket.listen(tmp_path, "alice") as new:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(str(idesocket.socket_path(tmp_path, "alice")))
                new.settimeout(2)
                new.accept()[0].close()
            old.setblocking(False)
            with pytest.raises(BlockingIOError):
                old.accept()  # the old descriptor's holder gets nothing meant for the new IDE
    idesocket.remove(tmp_path, "alice")
    assert not idesocket.socket_path(tmp_path, "alice").exists()
    idesocket.remove(tmp_path, "alice")  # already gone: fine


def test_a_symlink_where_the_socket_directory_belongs_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ide").symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="symlink"):
        idesocket.listen(tmp_path / "run", "alice")
    assert list(elsewhere.iterdir()) == [] and os.stat(elsewhere).st_mode & 0o777 == 0o755


def test_leftovers_of_user_owned_socket_directories_go_without_following_symlinks(tmp_path: Path) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "precious").write_text("keep\n")
    users = tmp_path / "run" / "users"
    (users / "alice").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(users / "alice" / "ide.sock"))
    (users / "alice" / "link-to-file").symlink_to(victim_dir / "precious")
    (users / "alice" / "link-to-dir").symlink_to(victim_dir)
    (users / "bob").symlink_to(victim_dir)  # the user's directory itself swapped for a symlink
    (users / "carol" / "nested").mkdir(parents=True)  # a directory of the user's: left, logged
    for path in (users / "alice", users / "carol"):
        os.chown(path, 65534, 65534)
    assert idesocket.remove_legacy(tmp_path / "run") == 1
    assert sorted(p.name for p in users.iterdir()) == ["carol"]
    assert (victim_dir / "precious").read_text() == "keep\n"
    assert idesocket.remove_legacy(tmp_path / "nothing-here") == 0


# ---- the Theia preload with real node ---------------------------------------------------------------


SERVER_JS = """
const http = require('http');
const server = http.createServer((req, res) => res.end(JSON.stringify({
    uid: process.getuid(), listen: Object.keys(process.env).filter((k) => k.startsWith('LISTEN_')),
})));
server.listen(3000, '0.0.0.0', () => console.log('listening on ' + server.address()));
"""


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
def test_the_preload_adopts_fd_3_with_real_node() -> None:
    assert NODE is not None
    tmp_path = Path(tempfile.mkdtemp(prefix="wsup-preload-", dir="/tmp"))  # readable by the uid node runs as
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "server.js"
    script.write_text(SERVER_JS)
    os.chmod(script, 0o644)
    argv = [NODE, "--require", str(PRELOAD), str(script)]
    env = {"PATH": "/usr/bin:/bin", **idesocket.LISTEN_ENV}
    with idesocket.listen(tmp_path / "run", "nodeuser") as listener:
        proc = subprocess.Popen(
            on_fd3(listener.fileno(), ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]),
            pass_fds=(listener.fileno(),), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "listening on fd 3 (LISTEN_FDS)\n"
        path = idesocket.socket_path(tmp_path / "run", "nodeuser")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(str(path))
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"uid": 65534, "listen": []}
        assert peer(path) == (proc.pid, 65534)  # node's own listen() on fd 3
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # Without the hand-over the preload throws at the first listen() instead of opening TCP.
    refused = subprocess.run(argv, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    shutil.rmtree(tmp_path)
    assert refused.returncode != 0 and "refusing to listen on TCP" in refused.stderr, refused.stderr


# ---- a hostile user against a real daemon -----------------------------------------------------------


ATTACK = r"""
import json, os, signal, socket, sys
run, me, other, ide_pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ide = os.path.join(run, "ide")
mine, theirs = os.path.join(ide, me + ".sock"), os.path.join(ide, other + ".sock")

def attempt(fn):
    try:
        fn()
        return "done"
    except OSError as exc:
        return type(exc).__name__

def bind(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)

results = {
    "list": attempt(lambda: os.listdir(ide)),
    "unlink": attempt(lambda: os.unlink(mine)),
    "symlink": attempt(lambda: os.symlink(theirs, mine)),
    "rename": attempt(lambda: os.rename(theirs, mine)),
    "bind": attempt(lambda: bind(mine)),
    "connect": attempt(lambda: socket.socket(socket.AF_UNIX).connect(theirs)),
    "move_dir": attempt(lambda: os.rename(ide, ide + ".old")),
    "new_dir": attempt(lambda: os.mkdir(os.path.join(run, "ide2"))),
    "old_layout": attempt(lambda: os.makedirs(os.path.join(run, "users", me))),
}
os.kill(ide_pid, signal.SIGKILL)  # and the user's own IDE dies: the restart must be theirs again
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def door(shared_dir: Path) -> Iterator[FrontDoorDaemon]:  # noqa: F811 - the imported fixture
    d = FrontDoorDaemon(shared_dir, restart__healthy_after="0s").start()
    yield d
    d.cleanup()


def test_a_user_cannot_redirect_the_front_door_with_anything_they_can_reach(door: FrontDoorDaemon) -> None:
    alice, bob = door.client(), door.client()
    assert alice.get("/", headers=bearer("ht-alice")).body.startswith(b"stub-ide user=ht-alice ")
    assert bob.get("/", headers=bearer("ht-bob")).body.startswith(b"stub-ide user=ht-bob ")
    victim, attacker = door.daemon.user("ht-bob"), door.daemon.user("ht-alice")
    run = door.daemon.base / "run"
    attack = tempfile.NamedTemporaryFile("w", suffix=".py", dir="/tmp", delete=False)
    with attack:
        attack.write(ATTACK)
    os.chmod(attack.name, 0o644)
    try:
        uid = attacker["uid"]
        result = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-S", attack.name, str(run), "ht-alice", "ht-bob", str(attacker["pid"])],
            capture_output=True, text=True, timeout=30, preexec_fn=lambda: (os.setgroups([]), os.setresgid(uid, uid, uid), os.setresuid(uid, uid, uid)),
        )
    finally:
        os.unlink(attack.name)
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout).values()) == {"PermissionError"}, result.stdout
    # Alice's IDE comes back (as alice, at the daemon's socket); her browser only ever reaches it.
    poll(lambda: (u := door.daemon.user("ht-alice"))["state"] == "RUNNING" and u["pid"] != attacker["pid"], 20, "alice's restart")
    again = alice.get("/", headers=bearer("ht-alice"))
    assert again.status == 200 and again.body.startswith(f"stub-ide user=ht-alice uid={uid} ".encode())
    assert peer(door.daemon.ide_socket("ht-alice"))[1] == uid
    assert bob.get("/", headers=bearer("ht-bob")).body.startswith(f"stub-ide user=ht-bob uid={victim['uid']} ".encode())
    assert door.daemon.user("ht-bob")["pid"] == victim["pid"]


def test_an_ide_that_never_listens_itself_is_refused_and_counted(door: FrontDoorDaemon) -> None:
    """The daemon's listen() stamps the socket with root's credentials; an IDE that accepts on fd 3
    without its own listen() leaves them so: the front door refuses to forward (502), logs why."""
    before = door.metric("workspace_supervisor_upstream_rejections_total", reason="peer_uid")
    answer = door.client().get("/", headers=bearer("nolisten-eve"))
    assert answer.status == 502 and answer.json()["reason"] == "ide_unavailable"
    assert door.daemon.user("nolisten-eve")["state"] == "RUNNING"  # it answers: only the check refuses it
    assert door.metric("workspace_supervisor_upstream_rejections_total", reason="peer_uid") == before + 1
    uid = door.daemon.user("nolisten-eve")["uid"]
    assert f"not the user's uid {uid} - an IDE must call listen() on the socket it receives as fd 3" in door.daemon.log_text()


def test_stopping_a_user_removes_its_socket(door: FrontDoorDaemon) -> None:
    assert door.daemon.ide_socket("ht-alice").exists()
    assert door.daemon.ctl("stop", "ht-alice").returncode == 0
    assert not door.daemon.ide_socket("ht-alice").exists()
