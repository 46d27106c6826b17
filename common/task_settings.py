"""A federation's task-specific settings (`[task_config]` in the coordinator's TOML).

The coordinator sends them in every task header that runs the task's code; the task's `train`
receives them as `TrainConfig.task_config` and its `evaluate` as `task_config`. They are data,
never code: only strings, integers, finite numbers and booleans, bounded in number and size, so
a hostile coordinator can make a client neither run anything nor hold much memory. Both sides
check them with `check_task_settings`: the coordinator when its config is loaded, the client on
every header.

The strategy adds its own settings to the same table (`Strategy.client_settings`). Names that
start with "fedlink." are fedlink's: a client's training reads them (FedProx's proximal term
`fedlink.proximal_mu`) and the task never sees them; a `[task_config]` may not use them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType

from google.protobuf.internal.containers import MessageMap

from fedlink.v1 import federation_pb2 as pb

SettingValue = str | int | float | bool
TaskSettings = Mapping[str, SettingValue]

MAX_SETTINGS = 64
MAX_NAME_CHARS = 64
MAX_TEXT_CHARS = 1024
# int64 on the wire (sint64).
_INT_RANGE = (-(1 << 63), (1 << 63) - 1)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")

NO_SETTINGS: TaskSettings = MappingProxyType({})

RESERVED_PREFIX = "fedlink."
# FedProx's proximal term mu, a number: clients add mu (w - w_global) to every local gradient.
PROXIMAL_MU = "fedlink.proximal_mu"
MAX_PROXIMAL_MU = 1e4


class TaskSettingsError(ValueError):
    """A task setting that is not a plain, bounded value (the message names it)."""


def check_task_settings(settings: Mapping[str, object]) -> TaskSettings:
    """The settings as a read-only mapping, or TaskSettingsError saying which one is wrong."""
    if not isinstance(settings, Mapping):
        raise TaskSettingsError(
            f"task_config must be a table of name = value, got {type(settings).__name__}"
        )
    if len(settings) > MAX_SETTINGS:
        raise TaskSettingsError(f"task_config has {len(settings)} settings; at most {MAX_SETTINGS}")
    checked: dict[str, SettingValue] = {}
    for name, value in settings.items():
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
            raise TaskSettingsError(
                f"task_config name {name!r} must be a letter or _ followed by letters, digits, "
                f"_ . or -, at most {MAX_NAME_CHARS} characters"
            )
        checked[name] = _check_value(name, value)
    return MappingProxyType(checked)


def _check_value(name: str, value: object) -> SettingValue:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise TaskSettingsError(f"task_config {name!r}: integer {value} is outside int64")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TaskSettingsError(f"task_config {name!r}: {value} is not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT_CHARS:
            raise TaskSettingsError(
                f"task_config {name!r}: a string of {len(value)} characters; at most "
                f"{MAX_TEXT_CHARS}"
            )
        return value
    raise TaskSettingsError(
        f"task_config {name!r} is a {type(value).__name__}; only strings, integers, numbers "
        "and booleans are allowed (no tables, lists or dates)"
    )


def write_settings(wire: MessageMap[str, pb.SettingValue], settings: TaskSettings) -> None:
    """Write `settings` (already checked) into a `TaskHeader.task_config` map."""
    for name, value in settings.items():
        if isinstance(value, bool):
            wire[name].flag = value
        elif isinstance(value, int):
            wire[name].integer = value
        elif isinstance(value, float):
            wire[name].number = value
        else:
            wire[name].text = value


def settings_from_proto(wire: Mapping[str, pb.SettingValue]) -> TaskSettings:
    """The settings a header carries, checked like the coordinator's own (TaskSettingsError)."""
    if len(wire) > MAX_SETTINGS:  # before any per-entry work
        raise TaskSettingsError(f"task_config has {len(wire)} settings; at most {MAX_SETTINGS}")
    values: dict[str, object] = {}
    for name, setting in wire.items():
        kind = setting.WhichOneof("value")
        if kind is None:
            raise TaskSettingsError(f"task_config {name!r} has no value")
        values[name] = getattr(setting, kind)
    return check_task_settings(values)


def merge_settings(task_config: TaskSettings, strategy: Mapping[str, object]) -> TaskSettings:
    """The settings every task header carries: the federation's `task_config` and the
    strategy's own, checked together (TaskSettingsError for a clash or a bad value)."""
    if reserved := sorted(name for name in task_config if name.startswith(RESERVED_PREFIX)):
        raise TaskSettingsError(
            f"task_config names starting with {RESERVED_PREFIX!r} are fedlink's own: rename "
            f"{', '.join(reserved)}"
        )
    if clash := sorted(set(task_config) & set(strategy)):
        raise TaskSettingsError(
            f"task_config sets {', '.join(clash)}, which the strategy sends itself; rename it"
        )
    return check_task_settings({**task_config, **strategy})


def split_settings(settings: TaskSettings) -> tuple[TaskSettings, TaskSettings]:
    """(the task's settings, fedlink's own: the names starting with "fedlink.")."""
    own = {name: value for name, value in settings.items() if name.startswith(RESERVED_PREFIX)}
    task = {name: value for name, value in settings.items() if name not in own}
    return MappingProxyType(task), MappingProxyType(own)
