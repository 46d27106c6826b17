"""Clients an administrator excluded from the run (the Admin service's ExcludeClient).

The list lives in `state_dir`, written durably before the exclusion takes effect, so a restarted
coordinator resuming the same run keeps refusing the same clients. A file that cannot be read
stops the coordinator: silently forgetting it would let an excluded client back in.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from fedlink.common.errors import AccessDenied, ConfigError
from fedlink.common.logs import escape_for_log
from fedlink.common.pki import validate_name
from fedlink.common.storage import write_durably

EXCLUSIONS_FILE = "excluded-clients.json"
# Characters of an administrator's reason kept (it is shown to the excluded client).
MAX_REASON = 200


@dataclass(frozen=True)
class Exclusion:
    reason: str
    at: str  # ISO 8601, UTC


class Exclusions:
    """The excluded identities, kept in `state_dir/excluded-clients.json`."""

    def __init__(self, state_dir: Path) -> None:
        self._path = Path(state_dir) / EXCLUSIONS_FILE
        self._lock = threading.Lock()
        self._excluded = self._load()

    def add(self, identity: str, reason: str) -> bool:
        """Exclude `identity` (durably); False when it already was."""
        validate_name(identity)  # PKIError: never an identity, so nothing to exclude
        reason = escape_for_log(reason.strip(), MAX_REASON) or "no reason given"
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            if identity in self._excluded:
                return False
            updated = {**self._excluded, identity: Exclusion(reason, now)}
            data = {name: {"reason": e.reason, "at": e.at} for name, e in sorted(updated.items())}
            write_durably(self._path, (json.dumps(data, indent=1) + "\n").encode())
            self._excluded = updated
        return True

    def check(self, identity: str) -> None:
        """AccessDenied (PERMISSION_DENIED) if `identity` was excluded."""
        exclusion = self._excluded.get(identity)
        if exclusion is not None:
            raise AccessDenied(
                "PERMISSION_DENIED",
                f"client {identity!r} was excluded from this run by the federation's "
                f"administrator at {exclusion.at} ({exclusion.reason}); it is refused until the "
                "run ends. Stop this client, and ask the coordinator's operator if this is a "
                "mistake",
            )

    def __contains__(self, identity: object) -> bool:
        return identity in self._excluded

    def reasons(self) -> dict[str, str]:
        """Each excluded identity and why."""
        return {name: exclusion.reason for name, exclusion in sorted(self._excluded.items())}

    def _load(self) -> dict[str, Exclusion]:
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the excluded clients in {self._path} ({exc}); restore the file, or "
                "delete it to admit every client again"
            ) from None
        if not isinstance(raw, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("reason"), str)
            and isinstance(v.get("at"), str)
            for v in raw.values()
        ):
            raise ConfigError(
                f"{self._path} is not a list of excluded clients written by fedlink; restore it, "
                "or delete it to admit every client again"
            )
        return {name: Exclusion(str(v["reason"]), str(v["at"])) for name, v in raw.items()}
