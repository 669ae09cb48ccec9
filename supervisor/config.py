"""One typed, validated, frozen configuration: TOML file plus ``WSUP_<SECTION>_<KEY>`` overrides.

Every setting is declared once, below, with its default and help text. Loading validates every
value; a bad one raises :class:`ConfigError` naming the key, the value and what is allowed, so the
daemon exits before it touches anything.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from supervisor.errors import ConfigError
from supervisor.units import parse_cpu, parse_duration, parse_percent, parse_size

DEFAULT_CONFIG_PATH = Path("/etc/workspace-supervisor/config.toml")
ENV_PREFIX = "WSUP_"


def setting(default: Any, help: str, parse: Callable[[Any], Any] | None = None) -> Any:
    """Declare a setting: its default, its help text and the parser that validates it."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "parse": parse}}
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda: type(default)(default)
    else:
        kwargs["default"] = default
    return field(**kwargs)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _int(minimum: int, maximum: int = 2**63) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("expected a whole number")
        if not minimum <= value <= maximum:
            raise ValueError(f"expected a whole number from {minimum} to {maximum}")
        return value

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError("expected true or false")


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return list(value)


def _argv(value: Any) -> list[str]:
    argv = _str_list(value)
    if not argv:
        raise ValueError("expected a non-empty list: the program and its arguments")
    return argv


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return parse


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("expected a table of string values")
    return dict(value)


def _listen(value: Any) -> str:
    text = _str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:8080")
    return text


def _optional_listen(value: Any) -> str:
    return "" if _str(value) == "" else _listen(value)


def _optional_address(value: Any) -> str:
    text = _str(value)
    if text == "":
        return ""
    host, _, port = _listen(text).rpartition(":")
    if not host.strip("[]") or int(port) == 0:
        raise ValueError("expected HOST:PORT that other machines can reach, e.g. 10.4.2.17:8080 or ws-pod-3.workspaces.svc:8080")
    return text


def normal_origin(text: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) origin, lower-case and without the scheme's default
    port (as browsers send ``Origin``); None for anything else (a path, user info, ``null``)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, {"http": 80, "https": 443}[parts.scheme]) else "")


def _origins(value: Any) -> list[str]:
    origins = []
    for text in _str_list(value):
        origin = normal_origin(text)
        if origin is None:
            raise ValueError(f"{text!r} is not an origin; expected scheme://host[:port], e.g. https://ide.example.com")
        origins.append(origin)
    return origins


def port_bounds(text: str) -> tuple[int, int]:
    """``LOW-HIGH`` (or one port) as (low, high); ValueError saying what is expected."""
    low, sep, high = text.strip().partition("-")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError("expected LOW-HIGH, two port numbers, e.g. 1024-65535") from None
    if not 1 <= bounds[0] <= bounds[1] <= 65535:
        raise ValueError("expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535, e.g. 1024-65535")
    return bounds


def _port_range(value: Any) -> str:
    low, high = port_bounds(_str(value))
    return f"{low}-{high}"


def _user_host(value: Any) -> str:
    import re

    text = _str(value).strip().lower()
    if text and (text.count("{user}") != 1 or not re.fullmatch(r"[a-z0-9.-]+", text.replace("{user}", "u"))):
        raise ValueError("expected a host name with {user} once, e.g. {user}.ide.example.com (no scheme, port or path)")
    return text


_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512")


def _algorithms(value: Any) -> list[str]:
    names = _str_list(value)
    for name in names:
        if name not in _JWT_ALGORITHMS:
            raise ValueError(f"{name!r} is not an accepted JWT algorithm; allowed: {', '.join(_JWT_ALGORITHMS)} ('none' never is)")
    if not names:
        raise ValueError("expected at least one algorithm")
    return names


def _path(value: Any) -> Path:
    return Path(_str(value))


def _optional_path(value: Any) -> Path | None:
    text = _str(value)
    return Path(text) if text else None


@dataclass(frozen=True)
class PodConfig:
    id: str = setting("", "Pod id in the registry; empty means the host name.", _str)
    capacity: int = setting(100, "Most users this pod runs at once.", _int(1, 100_000))
    memory: int = setting(0, "The pod's memory for pressure decisions and the registry's headroom (0 = the daemon's cgroup limit, the pod's in Kubernetes; else the host's RAM).", parse_size)
    address: str = setting(
        "",
        "HOST:PORT at which routers reach this pod's front door, published in the registry. Empty: the front door's own "
        "address, a wildcard host (0.0.0.0, ::) replaced by this host's name resolved (the pod IP in Kubernetes) or else "
        "its default route's source address; empty in the registry when the front door is off.",
        _optional_address,
    )


@dataclass(frozen=True)
class WorkspaceConfig:
    root: Path = setting(Path("/workspace"), "Root of the shared workspace volume.", _path)
    shards: int = setting(10, "Shard directories under the root (a contract: never change it on a live volume).", _int(1, 1_000_000))


@dataclass(frozen=True)
class UsersConfig:
    uid_min: int = setting(200_000, "Lowest uid handed to a new user.", _int(1000, 2**31 - 2))
    uid_max: int = setting(999_999_999, "Highest uid handed to a new user.", _int(1000, 2**31 - 2))


@dataclass(frozen=True)
class IdeConfig:
    command: list[str] = setting(
        [
            "/usr/bin/node", "--expose-gc",
            "--require", "/opt/theia/unix-socket-preload.js", "--require", "/opt/theia/gc-preload.js",
            "/opt/theia/lib/backend/main.js", "{workspace}", "--hostname", "127.0.0.1",
            "--session-preference=security.workspace.trust.enabled=false", "--no-cluster",
        ],
        "IDE argv; placeholders {user}, {workspace}, {home}. It must serve HTTP on the listening Unix "
        "socket it receives as fd 3 (LISTEN_FDS=1, LISTEN_FDNAMES=ide; the Theia preload adopts it), "
        "calling listen() on it itself. "
        "Node flags go on this command line, never in NODE_OPTIONS (it leaks into user terminals). "
        "Theia's --no-cluster runs its file watcher inside the backend instead of a second node "
        "process (~67 MiB RSS less per user; images/theia/README.md).",
        _argv,
    )
    env: dict[str, str] = setting({}, "Extra environment for the IDE (the rest is cleared).", _str_map)
    ready_timeout: float = setting(60.0, "How long an IDE may take to answer GET / on its socket.", parse_duration)
    stop_grace: float = setting(10.0, "Time between SIGTERM and SIGKILL of the whole tree.", parse_duration)
    shell: str = setting("/bin/bash", "SHELL given to the IDE (its terminals start it).", _str)
    launcher_pool: int = setting(
        2,
        "Launcher processes kept ready, each already inside a spare cgroup that a start renames to the "
        "user's (cgroup v1 only): the kernel's slow cgroup attach (~10 ms) leaves the start. 0 = off; "
        "an empty pool, cgroup v2 or any failure falls back to joining the user's group before exec.",
        _int(0, 64),
    )


@dataclass(frozen=True)
class RestartConfig:
    healthy_after: float = setting(10.0, "An IDE RUNNING this long that exits is restarted at once.", parse_duration)
    backoff_initial: float = setting(1.0, "First back-off after a fast failure.", parse_duration)
    backoff_max: float = setting(60.0, "Longest back-off.", parse_duration)
    max_failures: int = setting(5, "Fast failures in a row before the user is FATAL.", _int(1, 1000))


@dataclass(frozen=True)
class IdleConfig:
    lsp_pause_after: float = setting(
        120.0,
        "Idle time before language servers are frozen; the IDE also gets SIGUSR2 then (Theia's "
        "gc-preload.js runs a full V8 GC, then malloc_trim(0), which returns the ~40 MiB of free C "
        "heap an idle backend holds: tens of ms of the IDE's time, once per idle spell).",
        parse_duration,
    )
    gc_after: float = setting(
        300.0,
        "Idle time before the IDE is garbage-collected again (SIGUSR2, see lsp_pause_after) and the "
        "cgroup's memory.reclaim drops its page cache where the kernel has it.",
        parse_duration,
    )
    freeze_after: float = setting(900.0, "Idle time before the whole user is frozen.", parse_duration)
    stop_after: float = setting(3600.0, "Idle time before the IDE is stopped.", parse_duration)
    lsp_patterns: list[str] = setting(
        ["typescript-language-server", "tsserver", "pyright", "pylsp", "rust-analyzer", "clangd", "gopls", "plugin-host"],
        "Command-line substrings that mark a language server or extension host.",
        _str_list,
    )
    cpu_busy_threshold: float = setting(0.05, "A user's own CPU above this share of a core counts as activity.", parse_percent)
    tick: float = setting(1.0, "How often the ladder looks at every user.", parse_duration)
    keepalive_markers: list[str] = setting(
        ["does_not_matter"],
        "Browser WebSocket messages (up to 1 KiB) containing one of these are keep-alives, not input "
        "(Theia's connection-status service asks for the variable 'does_not_matter' every 5 s); "
        "engine.io ping/pong and WebSocket control frames never count.",
        _str_list,
    )
    max_watches: int = setting(2000, "Most inotify directory watches per user workspace (node_modules, .git ... are skipped).", _int(1, 1_000_000))
    memory_pressure: float = setting(
        0.9, "When the users together hold more than this share of the pod's memory, idle users are stopped early, longest idle first.", parse_percent
    )


def _cpu_or_zero(value: Any) -> int:
    return 0 if value in (0, "0") else parse_cpu(value)


@dataclass(frozen=True)
class TierConfig:
    cpu: int = setting(200, "CPU limit (200m, 0.5, 2).", parse_cpu)
    memory: int = setting(512 * 2**20, "Memory hard limit (512Mi).", parse_size)
    memory_high: float = setting(0.9, "memory.high as a share of memory (v2 only).", parse_percent)
    storage: int = setting(10 * 2**30, "Workspace storage quota (10Gi).", parse_size)
    sessions: int = setting(1, "Concurrent browser sessions allowed.", _int(1, 10_000))
    pids: int = setting(1024, "Most processes and threads in the user's tree.", _int(16, 4_194_304))
    start_cpu: int = setting(
        1000,
        "CPU allowed while STARTING, so a cold start takes about a second even on a small tier "
        "(0 = the tier's cpu); the tier's cpu applies once RUNNING.",
        _cpu_or_zero,
    )
    max_websockets: int = setting(
        64, "Most WebSockets the user may have open through the front door at once; one more gets 429 too_many_connections.", _int(1, 1_000_000)
    )
    max_requests: int = setting(
        128, "Most HTTP requests of the user in flight through the front door at once (a cold start's wait included); "
        "one more gets 429 too_many_connections.", _int(1, 1_000_000)
    )
    max_connections: int = setting(
        256, "Most client connections the user may hold to the front door at once (kept alive, in flight or WebSockets; a "
        "connection is the user's from its first request with the user's credentials); a request that would make one more "
        "gets 429 too_many_connections and the connection is closed.", _int(1, 1_000_000)
    )
    tmp_size: int = setting(
        256 * 2**20, "Size of each of the user's private /tmp, /var/tmp and /dev/shm ([isolation] mount); their "
        "pages count against the tier's memory.", parse_size,
    )
    idle: dict[str, Any] = setting({}, "Per-tier overrides of [idle].", lambda v: dict(_table(v)))


def _table(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("expected a table")
    return value


DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "free": {"cpu": "200m", "memory": "512Mi", "storage": "10Gi", "sessions": 1},
    "starter": {"cpu": "500m", "memory": "1Gi", "storage": "50Gi", "sessions": 5},
    "pro": {"cpu": "1000m", "memory": "2Gi", "storage": "100Gi", "sessions": 10},
}


@dataclass(frozen=True)
class ControlConfig:
    socket: Path = setting(Path("/run/workspace-supervisor/control.sock"), "workspacectl's Unix socket (root only).", _path)
    allowed_gid: int = setting(
        -1, "A group whose members may use workspacectl too (the socket becomes 0660 with that group; every "
        "client's peer credentials are checked); -1: only root and the daemon's own uid.", _int(-1, 2**32 - 2),
    )


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = setting(Path("/var/lib/workspace-supervisor"), "Where the daemon keeps its state file.", _path)
    run_dir: Path = setting(Path("/run/workspace-supervisor"), "Each IDE's listening socket lives here, made by the daemon: ide/<user>.sock (the directory root's, 0700; keep the path short, a socket path has at most 107 bytes).", _path)
    log_dir: Path = setting(Path("/var/log/workspace-supervisor"), "Per-user IDE logs.", _path)
    log_max_bytes: int = setting(10 * 2**20, "Rotate a user's log past this size.", parse_size)
    log_backups: int = setting(3, "Rotated logs kept per user.", _int(0, 100))
    log_level: str = setting("info", "Daemon log level.", _choice("debug", "info", "warning", "error"))
    sigterm: str = setting("stop", "On SIGTERM: 'stop' every user gracefully, or 'detach' (leave them running for a restarted daemon to adopt).", _choice("stop", "detach"))
    shutdown_deadline: float = setting(30.0, "Longest graceful stop of every user at shutdown (after a drain's wait); then what is left is killed.", parse_duration)
    drain_deadline: float = setting(
        15.0,
        "How long a drain (SIGTERM, or `workspacectl drain` without --deadline) lets connected users finish "
        "before their IDEs are stopped. Keep drain_deadline + shutdown_deadline under the pod's "
        "terminationGracePeriodSeconds (systemd: TimeoutStopSec).",
        parse_duration,
    )
    usage_interval: float = setting(10.0, "How often cgroup usage is sampled.", parse_duration)


def _cidrs(value: Any) -> list[str]:
    import ipaddress

    items = _str_list(value)
    for item in items:
        ipaddress.ip_network(item.strip(), strict=False)  # ValueError names it
    return items


@dataclass(frozen=True)
class NetworkConfig:
    """A user's outbound network ([isolation] network; supervisor/netstack.py)."""

    deny: list[str] = setting(
        ["169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"],
        "Destinations a user's connections are refused (cloud metadata, private and carrier-grade NAT ranges); the "
        "cluster's API service (KUBERNETES_SERVICE_HOST) is always added. IPv6 is refused whole.", _cidrs,
    )
    allow: list[str] = setting([], "Destinations allowed even though the deny list names them (e.g. a package mirror in the cluster); "
                               "never the pod's own addresses nor its loopback.", _cidrs)
    service_cidr: str = setting("", "The cluster's service range, denied too (e.g. 10.96.0.0/12; empty: unknown).",
                                lambda v: ",".join(_cidrs([v])) if v else "")
    mtu: int = setting(65520, "MTU of the user's tap0 (slirp4netns).", _int(1280, 65521))
    slirp4netns: Path = setting(Path("/usr/bin/slirp4netns"), "The user-mode network stack (Debian's slirp4netns).", _path)
    nft: Path = setting(Path("/usr/sbin/nft"), "nftables' nft, which loads the deny list into each user's namespace.", _path)
    ready_timeout: float = setting(5.0, "How long the deny list and slirp4netns may take to be ready for one user.", parse_duration)


#: The mechanisms of a user's private view of the machine ([isolation]; README "Each user's own view").
ISOLATION_MECHANISMS = ("network", "pid", "mount", "ipc", "uts", "identity", "seccomp")
_mechanism = _choice("on", "auto", "off")


@dataclass(frozen=True)
class IsolationConfig:
    """How each user's tree is kept apart from the others and from the pod. Every mechanism is
    ``on`` (the daemon refuses to start when the kernel or the pod's privileges cannot give it),
    ``auto`` (used when available, a warning otherwise) or ``off``."""

    network: str = setting(
        "on", "Own network namespace: own loopback, outbound through a user-mode stack (slirp4netns) "
        "filtered by [network]; the user's ports reach their browser at /port/<N>/. Needs mount.", _mechanism,
    )
    pid: str = setting("on", "Own PID namespace and /proc: a user sees only their own processes; `init` reaps orphans. Needs mount.", _mechanism)
    mount: str = setting(
        "on", "Own mount namespace: private /tmp, /var/tmp and /dev/shm (tmpfs of the tier's tmp_size, charged "
        "to the user), the daemon's run, state and log directories hidden, the rest of the image read-only "
        "except the workspace root (read_only_root).", _mechanism,
    )
    ipc: str = setting("on", "Own System V IPC and POSIX message queues.", _mechanism)
    uts: str = setting("on", "Own hostname (see hostname).", _mechanism)
    identity: str = setting(
        "on", "The user's uid and gid resolve to their name and HOME: a per-user /etc/passwd, /etc/group and "
        "/etc/hosts in their mount namespace (never an edit of the pod's files). Needs mount.", _mechanism,
    )
    seccomp: str = setting("on", "A system-call filter denies what no IDE session needs (supervisor/seccomp.py).", _mechanism)
    init: Path = setting(
        Path("/usr/bin/tini"), "PID 1 of each user's PID namespace: reaps orphans, passes signals on to the IDE "
        "and exits with its status (Debian's tini).", _path,
    )
    hostname: str = setting("{user}", "A user's hostname (uts); placeholder {user}. At most 64 bytes once expanded.", _str)
    read_only_root: bool = setting(True, "With mount: everything but the workspace root and the private tmpfs mounts is read-only.", _bool)


@dataclass(frozen=True)
class CgroupsConfig:
    driver: str = setting("auto", "auto, v1 or v2.", _choice("auto", "v1", "v2"))
    mount: Path = setting(Path("/sys/fs/cgroup"), "Where the cgroup hierarchies are mounted.", _path)
    name: str = setting("workspace-supervisor", "Name of the supervisor's subtree.", _str)


@dataclass(frozen=True)
class HttpConfig:
    listen: str = setting(
        "0.0.0.0:8080",
        "Front door address (port 0 picks a free port, logged as 'front door listening on HOST:PORT'); "
        "empty disables it. It also stays off, with a warning, until [auth] names a key.",
        _optional_listen,
    )
    header_timeout: float = setting(10.0, "A request's whole head must arrive within this, or the connection is cut (slowloris).", parse_duration)
    keepalive_timeout: float = setting(75.0, "An idle keep-alive connection is closed after this.", parse_duration)
    idle_timeout: float = setting(60.0, "An HTTP body that makes no progress for this long is cut off (WebSockets have no idle limit).", parse_duration)
    max_header_bytes: int = setting(32 * 2**10, "Largest request head (request line and headers); a larger one gets 431.", parse_size)
    max_connections: int = setting(10_000, "Most client connections at once; above it new ones get 503 and are closed.", _int(1, 10_000_000))
    max_unauthenticated: int = setting(
        64, "Most connections one client address (an IPv6 /64; every loopback address and the pod's own are one) may hold "
        "before a request on them presents valid credentials; above it new ones get 429 too_many_connections and are "
        "closed. Behind a proxy every browser has the proxy's address: raise it.", _int(1, 10_000_000)
    )
    unauthenticated_timeout: float = setting(
        10.0, "A connection on which no request has presented valid credentials yet is closed after this long without a "
        "request (instead of keepalive_timeout).", parse_duration
    )
    rejected_tokens: int = setting(
        60, "Rejected tokens one client address may send in a burst; after that, requests from it whose token would need its "
        "signature checked get 429 too_many_rejections (Retry-After), one more allowed per rejected_tokens_interval. "
        "Session cookies and tokens accepted before are not held back.", _int(1, 1_000_000)
    )
    rejected_tokens_interval: float = setting(1.0, "See rejected_tokens.", parse_duration)
    relay_memory: int = setting(
        128 * 2**20, "Bytes the WebSocket relay may hold read and not yet taken by the other side, over all connections; "
        "above it every connection is read 4 KiB at a time (and without the C fast path) until it is half that.", parse_size
    )
    max_cold_starts: int = setting(8, "Most IDE cold starts in flight at once; a request that would start one more gets 429.", _int(1, 100_000))
    start_timeout: float = setting(30.0, "How long a request is held while its user's IDE starts; then a 'starting' page that retries.", parse_duration)
    retry_after: float = setting(5.0, "Retry-After of 503 (pod full, draining, still starting) and 429 answers.", parse_duration)
    session_linger: float = setting(
        30.0,
        "A browser session (the token's sid) is live while it has a request or WebSocket open through the "
        "front door and for this long after its last one ends; a new sid above the tier's sessions gets 409.",
        parse_duration,
    )
    buffer_size: int = setting(256 * 2**10, "Bytes read per step when streaming bodies and WebSockets.", parse_size)
    kernel_splice: bool = setting(
        True, "Move large Content-Length bodies (answers and uploads) with os.splice through a pipe (never through Python); false passes them "
        "through h11. (WebSockets are always carried by the front door's relay thread.)", _bool
    )
    relay_fast_path: bool = setting(
        True, "Let the relay thread's C fast path (built at install when a C compiler is present) pass on WebSocket frames that need "
        "no decision without entering Python; false relays everything through Python. The log says which runs.", _bool
    )
    public_origins: list[str] = setting(
        [], "Origins (scheme://host[:port]) whose pages may use the session cookie for WebSockets and for requests that carry "
        "an Origin header; empty: only the request's own, https://<Host> (http://<Host> when [auth] cookie_secure = false).", _origins
    )
    user_host: str = setting(
        "", "One origin per user: the host each user's IDE is served at, e.g. {user}.ide.example.com; a request whose Host "
        "is not its user's is refused (403 wrong_host). Empty: every user on the front door's host(s).", _user_host
    )
    port_range: str = setting(
        "1024-65535", "The ports of a user's own network namespace the front door serves to that user at /port/<N>/ (with "
        "[isolation] network; LOW-HIGH); another port gets 403 port_not_allowed.", _port_range
    )

    @property
    def port_bounds(self) -> tuple[int, int]:
        return port_bounds(self.port_range)


@dataclass(frozen=True)
class AuthConfig:
    algorithms: list[str] = setting(["RS256", "ES256"], "JWT algorithms accepted (never 'none'; HS* only with hs256_secret_file).", _algorithms)
    public_key_file: Path | None = setting(None, "PEM public key.", _optional_path)
    jwks_file: Path | None = setting(None, "JWKS file (reloaded on change).", _optional_path)
    hs256_secret_file: Path | None = setting(
        None, "Development only: a file holding an HS256 secret (>= 32 bytes); then HS256 is the only algorithm accepted.", _optional_path
    )
    issuer: str = setting("", "Required iss claim.", _str)
    audience: str = setting("workspace", "Required aud claim.", _str)
    leeway: float = setting(30.0, "Clock leeway for exp/nbf.", parse_duration)
    cookie_secure: bool = setting(True, "Set Secure on the session cookie.", _bool)
    cookie_name: str = setting("wsup_session", "Name of the front door's session cookie (never forwarded to the IDE).", _str)
    cookie_samesite: str = setting("Lax", "SameSite of the session cookie: Lax, or Strict (only when the login page is same-site).", _choice("Lax", "Strict"))
    cookie_secret_file: Path | None = setting(
        None, "HMAC key (>= 32 bytes) signing session cookies; empty: <daemon.state_dir>/cookie.key, created once (0600).", _optional_path
    )


@dataclass(frozen=True)
class RegistryConfig:
    backend: str = setting("sqlite", "sqlite or fdb.", _choice("sqlite", "fdb"))
    path: Path = setting(Path("/var/lib/workspace-supervisor/registry.db"), "SQLite registry file.", _path)
    fdb_cluster_file: Path = setting(Path("/etc/foundationdb/fdb.cluster"), "FoundationDB cluster file.", _path)
    heartbeat: float = setting(5.0, "Heartbeat period: how often the pod publishes its occupancy.", parse_duration)
    lease: float = setting(15.0, "Lease after the last heartbeat: a pod silent this long is dead to routers (above heartbeat).", parse_duration)


@dataclass(frozen=True)
class ProbesConfig:
    listen: str = setting("0.0.0.0:9100", "/metrics, /healthz, /readyz, /admitting, /startupz.", _listen)


@dataclass(frozen=True)
class Config:
    pod: PodConfig = field(default_factory=PodConfig)
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    ide: IdeConfig = field(default_factory=IdeConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    control: ControlConfig = field(default_factory=ControlConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    cgroups: CgroupsConfig = field(default_factory=CgroupsConfig)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)

    @property
    def pod_id(self) -> str:
        return self.pod.id or socket.gethostname()

    def idle_for(self, tier: str) -> IdleConfig:
        """[idle] with the tier's [tiers.<name>.idle] overrides applied (validated at load)."""
        overrides = self.tiers[tier].idle if tier in self.tiers else {}
        return _build(IdleConfig, {**_raw_values(self.idle), **overrides}, f"tiers.{tier}.idle") if overrides else self.idle

    @property
    def frontdoor_off(self) -> str | None:
        """Why the front door does not run (no listen address, no key to verify tokens), or None."""
        if not self.http.listen:
            return "[http] listen is empty"
        auth = self.auth
        if auth.public_key_file is None and auth.jwks_file is None and auth.hs256_secret_file is None:
            return "no [auth] public_key_file, jwks_file or hs256_secret_file is configured"
        return None

    def tier(self, name: str) -> TierConfig:
        from supervisor.errors import UnknownTier

        try:
            return self.tiers[name]
        except KeyError:
            raise UnknownTier(f"unknown tier {name!r}; known: {', '.join(sorted(self.tiers))}") from None


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "tiers"}  # type: ignore[misc]


def _fail(errors: list[ConfigError] | None, error: ConfigError) -> None:
    """Raise ``error``; or, collecting every error (check-config), add it to ``errors``."""
    if errors is None:
        raise error
    errors.append(error)


def _build(cls: type, values: Mapping[str, Any], where: str, errors: list[ConfigError] | None = None) -> Any:
    """``cls`` from ``values``; a bad or unknown key fails (collecting: is left at its default)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(set(values) - set(known)):
        _fail(errors, ConfigError(f"unknown key {where}.{name}; allowed in [{where}]: {', '.join(sorted(known))}"))
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            continue
        parse = known[name].metadata.get("parse")
        try:
            kwargs[name] = parse(value) if parse else value
        except ValueError as exc:
            _fail(errors, ConfigError(f"bad value for {where}.{name}: {value!r}: {exc}"))
    return cls(**kwargs)


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str], errors: list[ConfigError] | None = None) -> None:
    """Apply ``WSUP_SECTION_KEY`` variables onto the raw TOML tree (in place)."""
    targets: dict[str, tuple[list[str], str]] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            targets[f"{ENV_PREFIX}{section}_{f.name}".upper()] = ([section], f.name)
    tier_names = set(raw.get("tiers", {})) | set(DEFAULT_TIERS)
    for tier in tier_names:
        for f in dataclasses.fields(TierConfig):
            targets[f"{ENV_PREFIX}TIERS_{tier}_{f.name}".upper().replace("-", "_")] = (["tiers", tier], f.name)
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        if variable not in targets:
            if variable in ("WSUP_CONFIG",):
                continue
            _fail(errors, ConfigError(f"unknown environment override {variable}", hint="variables are WSUP_<SECTION>_<KEY>, e.g. WSUP_POD_CAPACITY"))
            continue
        path, key = targets[variable]
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[key] = _env_value(text)


def _env_value(text: str) -> Any:
    """Environment values are TOML literals when they parse as one (``50``, ``true``, ``["a"]``), text otherwise."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load(path: Path | None = None, environ: Mapping[str, str] | None = None, *, errors: list[ConfigError] | None = None) -> Config:
    """Load, override from the environment and validate. ``path=None`` uses embedded defaults only.
    A file that cannot be read or is not TOML always raises; for ``errors``, see :func:`from_dict`."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist", hint="pass --config FILE or create it") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return from_dict(raw, environ, errors=errors)


def from_dict(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, *, errors: list[ConfigError] | None = None) -> Config:
    """Validate a raw config tree (as parsed from TOML) into a :class:`Config`. The first error
    raises; with ``errors`` (a list) every error is added to it instead, bad keys left at their
    defaults, and the Config returned is only good for further checks."""
    tree: dict[str, Any] = _deep_copy(dict(raw))
    _env_overrides(tree, environ or {}, errors)
    for name in sorted(set(tree) - set(_SECTIONS) - {"tiers"}):
        _fail(errors, ConfigError(f"unknown section [{name}]; allowed: {', '.join(sorted([*_SECTIONS, 'tiers']))}"))
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        sections[section] = _build(cls, _table_or_error(tree.get(section, {}), section, errors), section, errors)
    tiers_raw = tree.get("tiers", {})
    if not isinstance(tiers_raw, dict):
        _fail(errors, ConfigError("[tiers] must be a table of tables, e.g. [tiers.free]"))
        tiers_raw = {}
    tiers: dict[str, TierConfig] = {}
    for name in sorted(set(DEFAULT_TIERS) | set(tiers_raw)):
        values = {**DEFAULT_TIERS.get(name, {}), **_table_or_error(tiers_raw.get(name, {}), f"tiers.{name}", errors)}
        tiers[name] = _build(TierConfig, values, f"tiers.{name}", errors)
    config = Config(tiers=tiers, **sections)
    for error in _consistency_errors(config):
        _fail(errors, error)
    return config


def _raw_values(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _table_or_error(value: Any, where: str, errors: list[ConfigError] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(errors, ConfigError(f"[{where}] must be a table"))
        return {}
    return value


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _consistency_errors(config: Config) -> Iterator[ConfigError]:
    """What is wrong between keys (each key valid on its own)."""
    if config.users.uid_min > config.users.uid_max:
        yield ConfigError(f"users.uid_min ({config.users.uid_min}) is above users.uid_max ({config.users.uid_max})")
    if not 0 < config.registry.heartbeat < config.registry.lease:
        yield ConfigError(
            f"registry.heartbeat ({config.registry.heartbeat:g}s) must be above 0 and below registry.lease "
            f"({config.registry.lease:g}s), or the pod's record expires between heartbeats"
        )
    if config.restart.backoff_initial > config.restart.backoff_max:
        yield ConfigError("restart.backoff_initial is above restart.backoff_max")
    for tier in config.tiers:
        try:
            ladder = config.idle_for(tier)
        except ConfigError as exc:
            yield exc
            continue
        if not ladder.lsp_pause_after <= ladder.gc_after <= ladder.freeze_after <= ladder.stop_after:
            yield ConfigError(
                f"idle steps of tier {tier} must be in order: lsp_pause_after <= gc_after <= freeze_after <= stop_after"
            )
    if not config.workspace.root.is_absolute():
        yield ConfigError(f"workspace.root must be an absolute path, not {str(config.workspace.root)!r}")
    yield from _auth_errors(config.auth)
    iso = config.isolation
    for mechanism in ("network", "pid", "identity"):
        if getattr(iso, mechanism) != "off" and iso.mount == "off":
            yield ConfigError(
                f"isolation.{mechanism} needs isolation.mount (a private /proc, resolv.conf or passwd is mounted)",
                hint=f'set isolation.mount = "on" (or "auto"), or isolation.{mechanism} = "off"',
            )
    placeholders = {"{user}", "{workspace}", "{home}"}
    for arg in [*config.ide.command, *config.ide.env.values()]:
        if "{socket}" in arg:
            yield ConfigError(
                "ide.command or ide.env uses {socket}, which is gone: the daemon now binds each IDE's socket "
                "and hands it over as fd 3 (LISTEN_FDS=1); the IDE must serve on that descriptor",
                hint="remove {socket} (and any WSUP_IDE_SOCKET) from [ide]; Theia's unix-socket-preload.js adopts fd 3",
            )
            break
    for arg in config.ide.command:
        for token in _placeholders(arg):
            if token not in placeholders:
                yield ConfigError(
                    f"ide.command uses unknown placeholder {token}; allowed: {', '.join(sorted(placeholders))}"
                )


def _auth_errors(auth: AuthConfig) -> Iterator[ConfigError]:
    symmetric = [a for a in auth.algorithms if a.startswith("HS")]
    if auth.hs256_secret_file is not None:
        if auth.public_key_file is not None or auth.jwks_file is not None:
            yield ConfigError("auth.hs256_secret_file cannot be combined with auth.public_key_file or auth.jwks_file (HS* is never accepted when an asymmetric key is configured)")
    elif symmetric:
        yield ConfigError(f"auth.algorithms lists {symmetric[0]} but no auth.hs256_secret_file is set (HS* is for development only)")
    if auth.public_key_file is not None and auth.jwks_file is not None:
        yield ConfigError("set only one of auth.public_key_file and auth.jwks_file")


def _placeholders(arg: str) -> list[str]:
    import re

    return re.findall(r"\{[^{}]*\}", arg)


def describe() -> str:
    """Every setting at its default as a TOML document, help as comments (the reference docs): it
    parses, and :func:`from_dict` gives the default :class:`Config` back. Unset optional values
    are commented out; ``[tiers.<name>.idle]`` is shown as a commented example."""
    lines = [
        "# workspace-supervisor configuration: every setting at its default (`workspace-supervisor config-reference`).",
        "# Durations 90s, 2m, 1h30m, 250ms; sizes 512Mi, 2Gi; CPU 200m, 1.5. Any key: env WSUP_<SECTION>_<KEY>.",
    ]
    defaults = from_dict({})
    for section in (f.name for f in dataclasses.fields(Config)):
        if section != "tiers":
            lines += ["", f"[{section}]", *_describe_fields(getattr(defaults, section), helps=True)]
            continue
        for n, name in enumerate(DEFAULT_TIERS):
            tier = defaults.tiers[name]
            lines += ["", f"[tiers.{name}]", *_describe_fields(tier, helps=n == 0, skip=("idle",))]
            if n == 0:
                lines += ["# Per-tier overrides of [idle]: any [idle] key in a [tiers.<name>.idle] table, e.g.",
                          f"# [tiers.{name}.idle]", '# stop_after = "30m"']
    return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, 110, initial_indent="# ", subsequent_indent="# ") or ["#"]


def _describe_fields(section: Any, *, helps: bool, skip: tuple[str, ...] = ()) -> list[str]:
    lines: list[str] = []
    for f in dataclasses.fields(section):
        if f.name in skip:
            continue
        if helps:
            lines += _comment(f.metadata.get("help", ""))
        value = getattr(section, f.name)
        if value is None:
            lines.append(f'# {f.name} = ""  # unset')
        else:
            lines.append(f"{f.name} = {_toml(value, f.metadata.get('parse'))}")
    return lines


def _toml(value: Any, parse: Any) -> str:
    """``value`` as a TOML literal that ``parse`` reads back as ``value``."""
    import json

    if parse in (parse_cpu, _cpu_or_zero):
        return f'"{value}m"' if value else "0"
    if parse is parse_size:
        text = _size(value)
        return text if text.isdigit() else json.dumps(text)
    if parse is parse_duration:
        return json.dumps(_duration(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v, None) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v, None)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def _size(size: int) -> str:
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _duration(seconds: float) -> str:
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    millis = round(seconds * 1000)
    return f"{millis}ms" if millis * 0.001 == seconds else repr(seconds)
