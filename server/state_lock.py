"""One live coordinator per state directory.

Two coordinators on one `state_dir` would delete each other's model files mid-download and
interleave checkpoints. The lock is an `flock` on `state_dir/coordinator.lock`: the kernel drops
it when the owner dies, however it dies, so a crash never leaves the directory locked. The file
also names the owner (pid, host, start time) for the refusal message, and a name left by a
process that no longer holds the lock shows that the previous coordinator did not stop cleanly.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from fedlink.common.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "coordinator.lock"
# The owner line is short; never read more than this from a file anyone could have written.
_OWNER_BYTES = 256


class StateDirLock:
    """Held for as long as this process coordinates from the directory."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    def release(self) -> None:
        """Clear the owner line (a clean stop leaves nothing to take over) and unlock."""
        if self._fd < 0:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = -1


def lock_state_dir(state_dir: Path) -> StateDirLock:
    """Take `state_dir` for this process, or raise ConfigError naming the live owner."""
    path = state_dir / LOCK_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"state_dir {state_dir} is not usable: {exc.strerror or exc}; give the coordinator "
            "a writable directory (--state-dir)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner(fd) or "another process"
        os.close(fd)
        raise ConfigError(
            f"state_dir {state_dir} is in use by another coordinator ({owner}); stop that one "
            "first, or give this one its own --state-dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot lock state_dir {state_dir}: {exc.strerror or exc}") from None
    previous = _owner(fd)
    if previous:
        log.warning(
            "state_dir %s: taking over from a coordinator that did not stop cleanly (%s)",
            state_dir,
            previous,
        )
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    line = f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, line, 0)
    return StateDirLock(fd, path)


def _owner(fd: int) -> str:
    """The owner line of the lock file, printable characters only."""
    text = os.pread(fd, _OWNER_BYTES, 0).decode("utf-8", "replace").strip()
    return "".join(c for c in text if c.isprintable())
