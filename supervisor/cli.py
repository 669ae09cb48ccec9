"""`workspacectl`: the operator CLI, a thin client of the daemon's control socket.

Kept import-light (stdlib only, no trio) so that every call is fast. Results go to stdout,
diagnostics to stderr. Every read verb has ``--json`` (with ``"version": 1``).
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import socket
import sys
import time
from typing import Any, NoReturn

# Exit codes (a contract with operators' scripts).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN_USER = 3
EXIT_UNREACHABLE = 4

DEFAULT_SOCKET = "/run/workspace-supervisor/control.sock"
JSON_VERSION = 1
_REASON_EXIT = {"unknown_user": EXIT_UNKNOWN_USER, "invalid_user_id": EXIT_USAGE, "bad_request": EXIT_USAGE,
                "control_peer_refused": EXIT_UNREACHABLE}
# What a user's log must not send to the operator's terminal: C0 controls but newline and tab (ESC
# starts the sequences that retitle, move the cursor, rewrite lines; CR overwrites a line), DEL, C1
# controls, bidirectional overrides (reorder what is shown), and undecodable bytes (lone surrogates).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


class CliError(Exception):
    def __init__(self, message: str, code: int, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


class Connection:
    """One request/response exchange (or a stream, for ``tail -f``) with the daemon."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise CliError(f"cannot reach the daemon: {path} does not exist", EXIT_UNREACHABLE,
                           "is workspace-supervisor running? (systemctl status workspace-supervisor, or --socket PATH)") from None
        except PermissionError:
            raise CliError(f"cannot reach the daemon: permission denied on {path}", EXIT_UNREACHABLE, "run as root") from None
        except OSError as exc:
            raise CliError(f"cannot reach the daemon at {path}: {exc.strerror or exc}", EXIT_UNREACHABLE,
                           "is workspace-supervisor running?") from None
        self.reader = self.sock.makefile("rb")

    def request(self, verb: str, args: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps({"verb": verb, "args": args}).encode() + b"\n")

    def read(self) -> dict[str, Any] | None:
        try:
            line = self.reader.readline()
        except socket.timeout:
            raise CliError("the daemon did not answer in time", EXIT_FAILED, "retry with a longer --timeout") from None
        if not line:
            return None
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, verb: str, args: dict[str, Any]) -> Any:
        self.request(verb, args)
        answer = self.read()
        if answer is None:
            raise CliError("the daemon closed the connection without answering", EXIT_FAILED, "see the daemon's log")
        if not answer.get("ok"):
            error = answer.get("error", {})
            raise CliError(error.get("message", "request failed"), _REASON_EXIT.get(error.get("reason", ""), EXIT_FAILED), error.get("hint", ""))
        return answer.get("result")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _dump(data: dict[str, Any]) -> None:
    print(json.dumps({"version": JSON_VERSION, **data}, indent=2, sort_keys=True))


def _size(value: int | None) -> str:
    if not value:
        return "-"
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= factor:
            return f"{value / factor:.0f}{unit}"
    return str(value)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if not whole:
        return "-"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def print_status(users: list[dict[str, Any]]) -> None:
    rows = [("USER", "STATE", "PID", "TIER", "MEMORY", "CPU", "UPTIME", "RESTARTS", "DETAIL")]
    for u in users:
        rows.append((
            u["user"], u["state"], str(u["pid"] or "-"), u["tier"],
            f"{_size(u['memory_bytes'])}/{_size(u['memory_limit_bytes'])}",
            f"{u['cpu_limit_millicores']}m" if u["cpu_limit_millicores"] else "-",
            _duration(u["uptime_s"]), str(u["restarts"]), "; ".join(filter(None, (u.get("reason"), u.get("state_file_error")))),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def print_pod(pod: dict[str, Any]) -> None:
    width = max(len(k) for k in pod)
    for key, value in pod.items():
        if isinstance(value, dict):
            value = ", ".join(k if v is True else f"{k}={v}" for k, v in value.items() if v) or "-"
        print(f"{key.ljust(width)}  {value}")


def print_pods(pods: list[dict[str, Any]]) -> None:
    rows = [("POD", "USERS", "SESSIONS", "FREE", "RESERVED", "ROOM", "CPU-FREE", "MEM-FREE", "DRAINING", "HEARTBEAT", "VERSION", "ADDRESS")]
    for p in pods:
        rows.append((
            p["pod_id"], f"{p['active_users']}/{p['capacity']}", str(p["sessions"]), str(p["free_slots"]),
            str(p["reserved"]), str(p["room"]), f"{p['cpu_headroom_millicores']}m", _size(p["memory_headroom_bytes"]),
            "yes" if p["draining"] else "no", f"{p['heartbeat_age_s']:.1f}s ago", p["daemon_version"] or "-",
            p.get("address") or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def print_drain(drain: dict[str, Any]) -> None:
    if drain["phase"] == "waiting":
        active = drain["active_users"]
        print(f"draining: admitting no new users; {active} active user(s) get {drain['deadline_in_s']:g}s to finish, "
              "then every IDE is stopped gracefully, the pod leaves the registry and the daemon exits")
    else:
        print(f"draining: {drain['phase']}")


def _wait_until_gone(args: argparse.Namespace) -> int:
    """After `drain --wait`: poll the control socket until the daemon has exited."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            Connection(args.socket, 5).close()
        except CliError as exc:
            if exc.code != EXIT_UNREACHABLE:
                raise
            print("drained: the daemon has exited", file=sys.stderr)
            return EXIT_OK
        time.sleep(0.2)
    raise CliError(f"the daemon is still draining after {args.timeout:g}s", EXIT_FAILED,
                   "see `workspacectl pod`; wait longer with --timeout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workspacectl", description="Operate a workspace-supervisor daemon.")
    parser.add_argument("--socket", default=os.environ.get("WSUP_CONTROL_SOCKET", DEFAULT_SOCKET),
                        help="control socket (default: $WSUP_CONTROL_SOCKET or %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, users: str | None = None, json_flag: bool = False) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help)
        if users == "many":
            sub.add_argument("users", nargs="*", metavar="USER")
        elif users == "one":
            sub.add_argument("user", metavar="USER")
        if json_flag:
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    verb("status", "show users (all, or the ones named)", "many", json_flag=True)
    start = verb("start", "start a user's IDE, or change its tier in place; waits until RUNNING", "one", json_flag=True)
    start.add_argument("--tier", help="licence tier")
    start.add_argument("--no-wait", action="store_true", help="return once the IDE is spawned (STARTING)")
    verb("stop", "stop a user's IDE (USER or 'all'); returns once the tree is gone", "one", json_flag=True)
    verb("restart", "stop then start a user's IDE", "one", json_flag=True)
    verb("pause", "freeze a user's whole process tree", "one", json_flag=True)
    verb("resume", "thaw a paused user", "one", json_flag=True)
    sig = verbs.add_parser("signal", help="send a signal to a user's IDE", description="send a signal to a user's IDE")
    sig.add_argument("signal", metavar="SIG", help="TERM, HUP, USR2, 9 ...")
    sig.add_argument("user", metavar="USER")
    sig.add_argument("--json", action="store_true")
    tail = verb("tail", "print the end of a user's IDE log (--json: one object per chunk, as JSON lines)", "one", json_flag=True)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    tail.add_argument("-n", "--lines", type=int, default=20)
    tail.add_argument("--raw", action="store_true",
                      help="write the log's bytes as they are (by default control characters but newline and tab are "
                      "shown escaped, e.g. \\x1b: a user's log must not drive the terminal)")
    verb("pod", "show the pod: capacity, occupancy, cgroup driver", json_flag=True)
    drain = verb("drain", "admit no new users, let connected users finish until the deadline, then stop every IDE "
                 "gracefully, leave the registry and exit", json_flag=True)
    drain.add_argument("--deadline", metavar="D", help="time connected users get to finish: 90s, 10m, 0 ... "
                       "(default: [daemon] drain_deadline); a second drain can only shorten it")
    drain.add_argument("--wait", action="store_true", help="return once the daemon has drained and exited (bounded by --timeout)")
    verb("pods", "list every live pod in the registry with its occupancy", json_flag=True)
    verb("why", "explain a user's idle stage: last activity per signal, next step, history", "one", json_flag=True)
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    timeout = None if getattr(args, "follow", False) else args.timeout
    conn = Connection(args.socket, timeout)
    try:
        if args.verb == "tail":
            return _tail(conn, args)
        call_args: dict[str, Any] = {}
        if args.verb == "status":
            call_args["users"] = args.users
        elif args.verb == "signal":
            call_args = {"user": args.user, "signal": args.signal}
        elif args.verb == "drain":
            call_args = {} if args.deadline is None else {"deadline": args.deadline}
        elif args.verb not in ("pod", "pods"):
            call_args["user"] = args.user
        if args.verb == "start":
            call_args.update(tier=args.tier, wait=not args.no_wait)
        result = conn.call(args.verb, call_args)
    finally:
        conn.close()
    return _report(args, result)


def print_why(why: dict[str, Any]) -> None:
    print(f"{why['user']}: {why['state']}, idle stage {why.get('idle_stage') or '-'}")
    print(f"  {why['explanation']}")
    for signal_name, ago in (why.get("last_activity_s") or {}).items():
        print(f"  last {signal_name}: {'never' if ago is None else _duration(ago) + ' ago'}")
    if why.get("next_step"):
        print(f"  next: {why['next_step']['stage']} in {_duration(why['next_step']['in_s'])}")
    for entry in why.get("history", []):
        print(f"  {entry['from']} -> {entry['to']}: {entry['reason']}")


def _report(args: argparse.Namespace, result: Any) -> int:
    if args.verb == "pods":
        _dump({"pods": result["pods"]}) if args.json else print_pods(result["pods"])
        return EXIT_OK
    if args.verb == "drain":
        _dump({"drain": result}) if args.json else print_drain(result)
        return _wait_until_gone(args) if args.wait else EXIT_OK
    if args.verb == "why":
        _dump({"why": result}) if args.json else print_why(result)
        return EXIT_OK
    if args.verb == "pod":
        _dump({"pod": result}) if args.json else print_pod(result)
        return EXIT_OK
    users = result["users"] if isinstance(result, dict) and "users" in result else [result]
    if getattr(args, "json", False):
        _dump({"users": users})
    else:
        print_status(users)
    if args.verb in ("start", "restart"):
        user = users[0]
        accepted = ("RUNNING", "STARTING") if getattr(args, "no_wait", False) else ("RUNNING",)
        if user["state"] not in accepted:
            print(f"workspacectl: {user['user']} did not reach RUNNING: {user['state']}: {user.get('reason', '')}", file=sys.stderr)
            print("hint: see `workspacectl tail " + user["user"] + "`", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def _tail(conn: Connection, args: argparse.Namespace) -> int:
    conn.request("tail", {"user": args.user, "lines": args.lines, "follow": args.follow})
    first = conn.read()
    if first is None or not first.get("ok"):
        error = (first or {}).get("error", {})
        raise CliError(error.get("message", "tail failed"), _REASON_EXIT.get(error.get("reason", ""), EXIT_FAILED), error.get("hint", ""))
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")  # a character split between chunks stays whole
    _emit_log(args, first["result"]["data"], first["result"]["log"], decoder)
    while args.follow:
        message = conn.read()
        if message is None:
            break
        _emit_log(args, message.get("data", ""), first["result"]["log"], decoder)
    _emit_log(args, "", first["result"]["log"], decoder, final=True)  # bytes of a character the log ends inside
    return EXIT_OK


def escape_controls(text: str) -> str:
    """``text`` with every character a terminal would act on (see ``_UNSAFE``) written as
    ``\\xNN`` / ``\\uNNNN``; an undecodable byte (a lone surrogate from ``surrogateescape``) as ``\\xNN``."""

    def escaped(match: re.Match[str]) -> str:
        code = ord(match.group())
        if 0xDC80 <= code <= 0xDCFF:
            return f"\\x{code - 0xDC00:02x}"
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(escaped, text)


def _emit_log(args: argparse.Namespace, data: str, log: str, decoder: codecs.IncrementalDecoder, *, final: bool = False) -> None:
    """One chunk of a log: as JSON, as the log's bytes (``--raw``), or escaped for a terminal."""
    if final and (args.json or args.raw):
        return
    if args.json:
        print(json.dumps({"version": JSON_VERSION, "user": args.user, "log": log, "data": data}))
        sys.stdout.flush()
        return
    raw = data.encode("utf-8", "surrogateescape")  # the daemon sends the bytes decoded with surrogateescape
    sys.stdout.buffer.write(raw if args.raw else escape_controls(decoder.decode(raw, final)).encode())
    sys.stdout.buffer.flush()


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: one place turns errors into exit codes; no tracebacks for operator errors."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except CliError as exc:
        print(f"workspacectl: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        sys.stderr.close()
        code = EXIT_FAILED
    sys.exit(code)


if __name__ == "__main__":
    main()
