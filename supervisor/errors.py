"""One error base class for everything an operator may see.

Every error carries a machine-readable ``reason`` (stable; also used as a metric label and in
JSON answers) and a ``hint`` that says what to do next.
"""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of all operator-facing errors."""

    reason: str = "error"
    hint: str = ""

    def __init__(self, message: str, *, reason: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        text = self.message
        return f"{text} (hint: {self.hint})" if self.hint else text


class ConfigError(SupervisorError):
    reason = "bad_config"
    hint = "fix the named key in the config file or its WSUP_* environment variable"


class InvalidUserId(SupervisorError):
    reason = "invalid_user_id"
    hint = "a user id is 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"


class UnsafePath(SupervisorError):
    reason = "unsafe_path"
    hint = "a workspace path component is a symlink or not a directory; inspect it by hand"


class UidExhausted(SupervisorError):
    reason = "uid_range_exhausted"
    hint = "widen [users] uid_min/uid_max"


class CgroupError(SupervisorError):
    reason = "cgroup_error"
    hint = "check that the daemon runs as root and that the cgroup hierarchy is mounted read-write"


class UnknownUser(SupervisorError):
    reason = "unknown_user"
    hint = "see `workspacectl status` for the users this daemon knows"


class CapacityExceeded(SupervisorError):
    reason = "pod_full"
    hint = "the pod is at capacity; place the user on another pod or raise [pod] capacity"


class Draining(SupervisorError):
    reason = "draining"
    hint = "the pod is draining; place the user on another pod"


class InvalidTransition(SupervisorError):
    reason = "invalid_state"


class UnknownTier(SupervisorError):
    reason = "unknown_tier"
    hint = "use one of the tiers defined under [tiers.*] in the config"


class LaunchError(SupervisorError):
    reason = "launch_failed"
    hint = "see the user's log with `workspacectl tail USER`"


class IsolationUnavailable(SupervisorError):
    reason = "isolation_unavailable"
    hint = "give the pod what the message names, or lower the named [isolation] mechanism to \"auto\" or \"off\""


class SeccompUnavailable(SupervisorError):
    reason = "seccomp_unavailable"
    hint = 'install libseccomp2 (Debian/Ubuntu: apt-get install libseccomp2), or set [isolation] seccomp = "off"'
