"""The idle ladder with the real Eclipse Theia, through the real daemon's front door.

One daemon runs the built Theia app (images/theia/app, both preloads) per user, reached only
through its front door; workbenches are loaded in a real headless Chromium (one tab per user at
``http://<user>.localhost:<port>/``) so that each backend starts watching the workspace and opens
a terminal, as for a real user. Thresholds are seconds (per tier, chosen by the token's ``tier``);
every wait is a poll on the daemon's own state, never a sleep standing in for a transition.

Checked: the first idle rung collects the backend's heap and hands its free C heap back (malloc_trim in
gc-preload.js: the backend's RSS falls by tens of MiB); language-server-like children are frozen
in the ``paused`` group and resume; a user whose own work keeps the CPU busy is never laddered; a
frozen user's WebSocket message is delivered after the thaw it causes, with no error; a user the
ladder stopped comes back through a cold start with their files intact. A workbench left open in
a tab goes idle too (its keep-alives are not input) and stays frozen while the tab keeps pinging;
once laddered its tree is within the 100 MiB target, and when its user comes back (a click, driven
over the DevTools protocol) the same workbench works: a new terminal runs a command, and the
Explorer shows the file it made and one made outside (Theia's file watcher, which runs inside the
backend with ``--no-cluster``, sees changes again).

The language-server stand-in: this Theia app has no ``@theia/plugin-ext``, hence no plugin host
and no language servers. The ladder finds language servers by command line among the processes of
the user's cgroup; the stand-in is started the way a user's own tool is, by Theia: the user's
``~/.bashrc`` starts a small ticker named ``pylsp`` (it appends to ``~/lsp-ticks`` every 20 ms)
from the terminal Theia opens on every page load (bash via node-pty, a child of the backend), so it
is a descendant of the backend in the user's cgroup, as a plugin host's servers are. (Theia's
file watcher is no longer a process of its own: the daemon runs Theia with ``--no-cluster``.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from integration.bench import theia_users as tu
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.frontdoor_client import ISSUER, Client, mint, ws_connect, ws_recv, ws_send
from tests.harness import SLOW, Daemon, http_get, lsp_progressing, lsp_ticks, poll

SECRET = b"idle-theia-test-secret-0123456789abcdef"
MISSING = tu.missing_requirements()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=str(MISSING)),
    pytest.mark.skipif(
        not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
        reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
    ),
]

# Tiers (the token's "tier" claim picks one) with ladders in seconds.
LADDER = {"lsp_pause_after": "3s", "gc_after": "5s", "freeze_after": "7s", "stop_after": "1h"}
QUICK = {"lsp_pause_after": "2s", "gc_after": "3s", "freeze_after": "4s", "stop_after": "6s"}
TIERS = {
    "ladder": {"cpu": "1", "memory": "1Gi", "sessions": 3, "idle": LADDER},
    "quick": {"cpu": "500m", "memory": "1Gi", "sessions": 3, "idle": QUICK},
    # Longer than Theia's 5 s keep-alive period, shorter than the test's patience.
    "tab": {"cpu": "1", "memory": "1Gi", "sessions": 3,
            "idle": {"lsp_pause_after": "8s", "gc_after": "9s", "freeze_after": "10s", "stop_after": "1h"}},
    # The same with an open tab, for the user who comes back: GC after 9 s, frozen 3 s later.
    "back": {"cpu": "1", "memory": "1Gi", "sessions": 3,
             "idle": {"lsp_pause_after": "8s", "gc_after": "9s", "freeze_after": "12s", "stop_after": "1h"}},
}
TICKER = "import os, time\nwhile True:\n    open(os.environ['HOME'] + '/lsp-ticks', 'a').write('.')\n    time.sleep(0.02)\n"
BASHRC = """# written by tests/test_idle_theia.py: a language-server stand-in started from Theia's terminal
if [ -z "$WSUP_LSP_STANDIN" ]; then
    export WSUP_LSP_STANDIN=1
    /usr/bin/python3 -I -S "$HOME/lsp_standin.py" pylsp --stdio >/dev/null 2>&1 &
fi
"""


class TheiaPod:
    def __init__(self) -> None:
        self.secret_dir = Path(tempfile.mkdtemp(prefix="wsup-idle-theia-", dir="/tmp"))
        (self.secret_dir / "hs256.key").write_bytes(SECRET)
        os.chmod(self.secret_dir / "hs256.key", 0o600)
        self.daemon = Daemon(**{
            "pod__capacity": 20,
            "http__listen": "127.0.0.1:0",
            "http__start_timeout": "90s",
            "auth__hs256_secret_file": str(self.secret_dir / "hs256.key"),
            "auth__issuer": ISSUER,
            "auth__cookie_secure": False,
            "ide__ready_timeout": "90s",
            "ide__env": {},
            "ide__command": tu.theia_command(),
            "daemon__usage_interval": "1s",
            "idle__tick": "250ms",
            "idle__cpu_busy_threshold": "15%",
            "idle__lsp_patterns": ["pylsp"],
            "tiers__ladder": TIERS["ladder"],
            "tiers__quick": TIERS["quick"],
            "tiers__tab": TIERS["tab"],
            "tiers__back": TIERS["back"],
        })
        self.port = 0
        self._browser: tu.Browser | None = None

    def start(self) -> TheiaPod:
        self.daemon.start()
        self.port = int(poll(lambda: (m := re.search(r"front door listening on 127\.0\.0\.1:(\d+)", self.daemon.log_text())) and m.group(1), 10, "front door"))
        return self

    @property
    def browser(self) -> tu.Browser:
        if self._browser is None:
            self._browser = tu.Browser(extra_args=["--window-size=1280,800"])  # room for the Explorer and a terminal
        return self._browser

    def token(self, user: str, tier: str) -> str:
        return mint(SECRET, user, tier=tier, sid=f"{user}-tab")

    def client(self, user: str, tier: str) -> Client:
        """A signed-in HTTP client (the session cookie set) that has not started the IDE yet."""
        client = Client("127.0.0.1", self.port, timeout=120)
        assert client.get(f"/?token={self.token(user, tier)}").status == 303
        return client

    def load_workbench(self, user: str, tier: str) -> int:
        """Load the user's workbench in a Chromium tab until the backend has opened its terminal,
        then close the tab (the user leaves). Returns the backend pid."""
        tab = self.browser.open(f"{tu.user_origin(user, self.port)}/?token={self.token(user, tier)}")
        try:
            pid = int(poll(lambda: self.pid(user), 90, f"{user}'s IDE to start"))
            poll(lambda: tu.workbench_ready(pid), 90, f"{user}'s workbench (its terminal)")
        finally:
            self.browser.close_tab(tab)
        return pid

    def pid(self, user: str) -> int | None:
        """The user's RUNNING IDE pid, None before the daemon has started it."""
        listed = self.daemon.ctl_json("status")["users"]
        info = next((u for u in listed if u["user"] == user), None)
        return info["pid"] if info and info["state"] == "RUNNING" else None

    def stage(self, user: str) -> Any:
        return self.daemon.user(user)["idle_stage"]

    def home(self, user: str) -> Path:
        workspace = Path(self.daemon.user(user)["workspace"])
        return workspace.parent / ".home" / user

    def cleanup(self) -> None:
        if self._browser is not None:
            self._browser.close()
        log = self.daemon.log_text()
        self.daemon.cleanup()
        shutil.rmtree(self.secret_dir, ignore_errors=True)
        assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def pod() -> Iterator[TheiaPod]:
    p = TheiaPod()
    try:
        yield p.start()
    finally:
        p.cleanup()


def rss(pid: int) -> int:
    memory = tu.proc_memory(pid)
    assert memory is not None
    return memory.rss


def frozen_group(group: Path) -> bool | None:
    """Whether a cgroup directory is frozen (v1 freezer.state or v2 cgroup.events), None if neither."""
    try:
        return (group / "freezer.state").read_text().strip() == "FROZEN"
    except OSError:
        pass
    try:
        return "frozen 1" in (group / "cgroup.events").read_text()
    except OSError:
        return None


def freezer_dirs(d: Daemon, user: str, child: str = "") -> list[Path]:
    dirs = [g / child if child else g for g in d.cgroup_dirs(user)]
    return [g for g in dirs if frozen_group(g) is not None]


def as_user(uid: int) -> Any:
    def drop() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return drop


# ---- checks ---------------------------------------------------------------------------------------


def test_first_idle_rung_collects_and_returns_the_c_heap(pod: TheiaPod) -> None:
    d = pod.daemon
    pid = pod.load_workbench("gc-user", "ladder")
    # While the user is active, sample the backend's RSS; the last active sample and the RSS once
    # the first rung's GC report is out bracket the collection.
    samples: list[int] = []
    while pod.stage("gc-user") == "active":
        samples.append(rss(pid))
        time.sleep(0.05)
        assert len(samples) < 2000 * SLOW, "the ladder did not reach its first rung"
    line = poll(lambda: next(iter(tu.gc_lines((d.base / "log" / "gc-user.log").read_text(errors="replace"))), None), 10, "the GC report line")
    assert samples, "the user left the active stage before its RSS was sampled"
    rss_before = samples[-1]
    rss_after = rss(pid)
    mib = 2**20
    print(
        f"\nFirst idle rung (GC + trim) on a backend that served a workbench: GC {line['ms']} ms, malloc_trim {line.get('trim_ms')} ms\n"
        f"  heap used  {line['heap_used_before'] / mib:7.1f} -> {line['heap_used_after'] / mib:7.1f} MiB\n"
        f"  heap total {line['heap_total_before'] / mib:7.1f} -> {line['heap_total_after'] / mib:7.1f} MiB\n"
        f"  RSS (node) {line['rss_before'] / mib:7.1f} -> {line['rss_after_gc'] / mib:7.1f} after the GC -> "
        f"{line['rss_after'] / mib:7.1f} MiB after malloc_trim\n"
        f"  RSS (/proc, before the step -> after it) {rss_before / mib:7.1f} -> {rss_after / mib:7.1f} MiB"
    )
    assert line["ok"] is True and line["pid"] == pid, line
    assert line["heap_used_after"] < line["heap_used_before"], line
    assert line["trimmed"] is True, line  # malloc-trim.node loaded (images/theia/build) and returned pages
    # The free C heap an idle backend holds (~40 MiB measured) goes back to the kernel.
    assert line["rss_after"] < line["rss_before"] - 20 * mib, line
    assert rss_after < rss_before - 20 * mib, (rss_before, rss_after)
    assert d.user("gc-user")["pid"] == pid and d.user("gc-user")["restarts"] == 0


def test_language_server_like_children_are_frozen_and_resume(pod: TheiaPod) -> None:
    d = pod.daemon
    client = pod.client("lsp-user", "ladder")
    assert client.get("/").status == 200  # cold start, so that the home exists for ~/.bashrc
    home = pod.home("lsp-user")
    uid = home.stat().st_uid
    for name, text in ((".bashrc", BASHRC), (".bash_profile", BASHRC), ("lsp_standin.py", TICKER)):
        (home / name).write_text(text)
        os.chown(home / name, uid, uid)
    pid = pod.load_workbench("lsp-user", "ladder")
    poll(lambda: lsp_ticks(home) > 0, 30, "the language-server stand-in to tick (started by ~/.bashrc in Theia's terminal)")
    standin = [p for p in tu.descendants(pid) if "pylsp" in tu.cmdline(p)]
    assert standin

    poll(lambda: pod.stage("lsp-user") != "active", 30, "the language servers to be paused")
    stage = pod.stage("lsp-user")
    assert stage in ("lsp_paused", "reclaimed"), stage
    paused = freezer_dirs(d, "lsp-user", "paused")
    assert paused and all(frozen_group(g) for g in paused)
    in_paused = tu.cgroup_pids(paused)
    assert {p.pid for p in standin} <= in_paused, (in_paused, standin)
    assert pid not in in_paused
    assert not lsp_progressing(home, 0.4), "the language-server stand-in still runs while paused"
    # The backend itself still serves (asked on its own socket: a request through the front door
    # would wake the user).
    assert " 200 " in http_get(d.ide_socket("lsp-user"), timeout=10).split("\r\n", 1)[0]

    began = time.monotonic()
    page = client.get("/")  # the user comes back
    took = time.monotonic() - began
    assert page.status == 200
    assert pod.stage("lsp-user") == "active"
    assert not any(frozen_group(g) for g in paused)
    assert lsp_progressing(home, 0.4), "the language-server stand-in did not resume"
    print(f"\nlanguage servers paused -> page answered through the front door in {took * 1000:.1f} ms; stand-in ticking again")
    history = [h["to"] for h in d.ctl_json("why", "lsp-user")["why"]["history"]]
    assert history[0] == "lsp_paused" and history[-1] == "active", history
    client.close()


def test_a_frozen_users_websocket_message_is_delivered_after_the_thaw(pod: TheiaPod) -> None:
    d = pod.daemon
    client = pod.client("ws-user", "ladder")
    assert client.get("/").status == 200
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    assert "theia-connection-token" in cookie
    origin = f"http://127.0.0.1:{pod.port}"
    ws = ws_connect("127.0.0.1", pod.port, "/socket.io/?EIO=4&transport=websocket",
                    headers={"Cookie": cookie, "Origin": origin}, timeout=30)
    try:
        assert ws.status == 101, ws.head
        opcode, payload = ws_recv(ws)
        assert opcode == 0x1 and payload.startswith(b"0{"), payload  # engine.io "open"
        client.close()

        poll(lambda: pod.stage("ws-user") == "frozen", 60, "the ladder to freeze the user")
        groups = freezer_dirs(d, "ws-user")
        assert groups and all(frozen_group(g) for g in groups), "the user's tree is not frozen"

        began = time.monotonic()
        ws_send(ws, b"40/services,", opcode=0x1)  # socket.io CONNECT to Theia's /services namespace
        opcode, payload = ws_recv(ws)
        took = time.monotonic() - began
        print(f"\nfrozen Theia: socket.io CONNECT answered after the thaw in {took * 1000:.1f} ms")
        assert opcode == 0x1 and payload.startswith(b"40/services,{"), payload  # not an error ("44...") or a close
        assert "sid" in json.loads(payload[len(b"40/services,"):])
        assert took < 1.0 * SLOW
        assert pod.stage("ws-user") == "active"
        assert not any(frozen_group(g) for g in groups)
        why = d.ctl_json("why", "ws-user")["why"]
        assert [h["to"] for h in why["history"]][-2:] == ["frozen", "active"], why["history"]
    finally:
        ws.close()


def test_a_user_running_a_cpu_bound_job_is_never_laddered(pod: TheiaPod) -> None:
    """The job runs in the busy user's cgroup as the user's uid (the CPU signal is the cgroup's
    usage, whoever in the tree spends it); an idle Theia next to it walks down the ladder."""
    d = pod.daemon
    busy, calm = pod.client("cpu-busy", "quick"), pod.client("cpu-calm", "quick")
    assert busy.get("/").status == 200 and calm.get("/").status == 200
    busy.close()
    calm.close()
    uid = Path(d.user("cpu-busy")["workspace"]).stat().st_uid
    procs_files = [g / "cgroup.procs" for g in d.cgroup_dirs("cpu-busy")]

    def join_and_drop() -> None:
        for procs in procs_files:
            procs.write_text(str(os.getpid()))
        as_user(uid)()

    spinner = subprocess.Popen(["/usr/bin/python3", "-I", "-S", "-c", "while True: pass"], preexec_fn=join_and_drop)
    try:
        # From the first CPU sample that sees the job on, the busy user must stay ACTIVE.
        poll(lambda: (d.user("cpu-busy")["last_activity_s"]["cpu"] or 99) < 1.5 and pod.stage("cpu-busy") == "active", 30,
             "the job's CPU to be seen")
        stages: list[str] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.is_set():
                stages.append(pod.stage("cpu-busy"))
                stop_sampling.wait(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            poll(lambda: pod.stage("cpu-calm") in ("frozen", None) or d.user("cpu-calm")["state"] == "STOPPED", 60,
                 "the idle user next to it to be frozen")
            time.sleep(1.0)  # a few more ladder ticks with the busy user still measured
        finally:
            stop_sampling.set()
            sampler.join()
        info = d.user("cpu-busy")
        print(f"\nbusy user: {len(stages)} samples, stages {sorted(set(stages))}, cpu last active {info['last_activity_s']['cpu']} s ago")
        assert set(stages) == {"active"}, stages
        assert info["state"] == "RUNNING" and info["last_activity_s"]["cpu"] < 3.0
    finally:
        spinner.kill()
        spinner.wait()


def test_a_stopped_user_comes_back_through_a_cold_start_with_files_intact(pod: TheiaPod) -> None:
    d = pod.daemon
    client = pod.client("stop-user", "quick")
    assert client.get("/").status == 200
    first_pid = d.user("stop-user")["pid"]
    workspace = Path(d.user("stop-user")["workspace"])
    uid = workspace.stat().st_uid
    saved = workspace / "src" / "notes.md"
    # The user saves a file (as their uid), then leaves.
    subprocess.run(["/usr/bin/python3", "-I", "-S", "-c",
                    f"import os; os.makedirs({str(saved.parent)!r}, exist_ok=True); open({str(saved)!r}, 'w').write('# my work\\n')"],
                   preexec_fn=as_user(uid), check=True)
    client.close()

    poll(lambda: d.user("stop-user")["state"] == "STOPPED", 60, "the ladder to stop the IDE")
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
    assert d.cgroup_dirs("stop-user") == []
    why = d.ctl("why", "stop-user")
    assert why.returncode == 0 and "stopped" in why.stdout

    began = time.monotonic()
    page = client.get("/", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"})  # same cookie
    cold = time.monotonic() - began
    assert page.status == 200 and b"<html" in page.body.lower(), page.body[:300]
    info = d.user("stop-user")
    assert info["state"] == "RUNNING" and info["pid"] != first_pid
    poll(lambda: pod.stage("stop-user") == "active", 5, "the new IDE to be tracked from ACTIVE")
    # Theia itself serves the file back (its download endpoint, behind its connection cookie).
    uri = urllib.parse.quote(saved.as_uri(), safe="")
    download = client.get(f"/file?{uri}")
    assert download.status == 200 and download.body == b"# my work\n", (download.status, download.body[:200])
    assert saved.stat().st_uid == uid
    print(f"\nstopped by the ladder; next page load cold-started Theia in {cold:.2f} s; file served back by Theia")
    client.close()


def test_an_untouched_open_tab_lets_its_user_go_idle(pod: TheiaPod) -> None:
    """An open workbench nobody touches still talks: engine.io answers the server's ping every
    30 s and Theia's connection-status service calls the backend every 5 s. Those keep-alives are
    not input: the user walks down the ladder with the tab open, and a keep-alive sent to the frozen
    backend does not wake it."""
    d = pod.daemon
    tab = pod.browser.open(f"{tu.user_origin('tab-user', pod.port)}/?token={pod.token('tab-user', 'tab')}")
    try:
        pid = int(poll(lambda: pod.pid("tab-user"), 90, "the IDE to start"))
        poll(lambda: tu.workbench_ready(pid), 90, "the workbench")
        # The "tab" tier freezes after 10 s without input.
        poll(lambda: pod.stage("tab-user") == "frozen", 40, "the user with an open tab to be frozen")
        frozen_at = time.monotonic()
        time.sleep(7)  # longer than Theia's 5 s keep-alive period: at least one is sent meanwhile
        info = d.user("tab-user")
        print(f"\nopen tab: frozen for {time.monotonic() - frozen_at:.1f} s; last activity {info['last_activity_s']}")
        assert info["idle_stage"] == "frozen", info
        assert [h["to"] for h in d.ctl_json("why", "tab-user")["why"]["history"]] == ["lsp_paused", "reclaimed", "frozen"]
    finally:
        pod.browser.close_tab(tab)


def explorer_names(devtools: tu.DevTools) -> list[str]:
    return list(devtools.evaluate("[...document.querySelectorAll('.theia-TreeNodeSegment')].map(e => e.textContent.trim())") or [])


def open_explorer(devtools: tu.DevTools) -> list[str]:
    """The Explorer's names; its side tab is clicked first when the view is not shown (clicking a
    shown view's tab would hide it)."""
    if not devtools.evaluate("(e => !!e && e.offsetWidth > 0)(document.getElementById('explorer-view-container'))"):
        devtools.click("#shell-tab-explorer-view-container")
    return explorer_names(devtools)


def test_a_laddered_workbench_works_when_its_user_comes_back(pod: TheiaPod) -> None:
    """An open tab walks down to FROZEN (GC and malloc_trim on the way); its tree is then within the
    100 MiB target. The user comes back to the same tab: opening a new terminal (a click in the
    menu) wakes the IDE, the terminal runs a command, and the Explorer shows both the file that
    command made and one made outside the IDE - Theia's in-process file watcher sees changes again."""
    d = pod.daemon
    user = "back-user"
    client = pod.client(user, "back")
    assert client.get("/").status == 200  # cold start: the workspace exists
    client.close()
    workspace = Path(d.user(user)["workspace"])
    uid = workspace.stat().st_uid

    def make(name: str) -> None:
        subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", f"open({str(workspace / name)!r}, 'w').write('x')"],
                       preexec_fn=as_user(uid), check=True)

    make("before.txt")
    tab = pod.browser.open(f"{tu.user_origin(user, pod.port)}/?token={pod.token(user, 'back')}")
    devtools: tu.DevTools | None = None
    try:
        pid = int(poll(lambda: pod.pid(user), 90, "the IDE to start"))
        poll(lambda: tu.workbench_ready(pid), 90, "the workbench")
        devtools = tu.DevTools(pod.browser, tab)
        poll(lambda: "before.txt" in open_explorer(devtools), 60, "the Explorer to list the workspace")
        assert not any(tu.is_file_watcher(p) for p in tu.descendants(pid)), "a separate file watcher process runs"

        poll(lambda: pod.stage(user) == "frozen", 60, "the user with an open tab to be frozen")
        line = poll(lambda: next(iter(tu.gc_lines((d.base / "log" / f"{user}.log").read_text(errors="replace"))), None), 10,
                    "the GC report line")
        assert line["ok"] is True and line["trimmed"] is True, line
        tree = tu.theia_tree(d.cgroup_dirs(user))
        tree_rss = sum(m.rss for m in tree)
        mib = 2**20
        print(f"\nfrozen with its tab open: tree RSS {tree_rss / mib:.1f} MiB, PSS {sum(m.pss for m in tree) / mib:.1f} MiB "
              f"({', '.join(f'{m.name} {m.rss / mib:.0f}' for m in tree)}); GC line {line}")
        assert tree_rss <= 100 * mib, [(m.name, m.rss / mib) for m in tree]

        # The user comes back: Terminal > New Terminal (the menu opens in the page; the new
        # terminal is a request to the backend, which wakes it).
        shells = {p.pid for p in tu.descendants(pid) if tu.is_shell(p)}
        began = time.monotonic()
        assert devtools.click(".lm-MenuBar-item", "Terminal")
        poll(lambda: devtools.click(".lm-Menu-itemLabel", "New Terminal"), 10, "the Terminal menu")
        poll(lambda: {p.pid for p in tu.descendants(pid) if tu.is_shell(p)} - shells, 30, "a new terminal's shell")
        took = time.monotonic() - began
        assert pod.stage(user) == "active"
        poll(lambda: devtools.evaluate("document.activeElement && document.activeElement.classList.contains('xterm-helper-textarea')"),
             30, "the new terminal to take the focus")
        made = workspace / "from-terminal.txt"

        def typed() -> bool:
            # Keys typed before the terminal is attached to its shell are lost: type again until the
            # command has run (touch is idempotent).
            devtools.type_line("touch from-terminal.txt")
            try:
                poll(made.exists, 3, "the command to run")
            except AssertionError:
                return False
            return True

        poll(typed, 60, "the terminal's command to create a file")
        assert made.stat().st_uid == uid
        poll(lambda: "from-terminal.txt" in explorer_names(devtools), 30, "the Explorer to show the terminal's file")
        make("from-outside.txt")
        poll(lambda: "from-outside.txt" in explorer_names(devtools), 30, "the Explorer to show a file made outside the IDE")
        info = d.user(user)
        assert info["pid"] == pid and info["restarts"] == 0, info
        history = [h["to"] for h in d.ctl_json("why", user)["why"]["history"]]
        assert history[:3] == ["lsp_paused", "reclaimed", "frozen"] and "active" in history[3:], history
        print(f"back: new terminal's shell {took * 1000:.0f} ms after the click; command ran; Explorer shows "
              f"{sorted(explorer_names(devtools))}")
    finally:
        if devtools is not None:
            devtools.close()
        pod.browser.close_tab(tab)
