"""Configuration: dataclass defaults < TOML file < FEDLINK_* environment < command-line flags.

Each config class is a frozen dataclass; every field is a key in the TOML file, an environment
variable (`FEDLINK_` + upper-case name) and a `--flag-name` on the command line, generated from
the same field, so the three can never disagree about what exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedlink.common.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

ENV_PREFIX = "FEDLINK_"
T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add `--config` and one `--flag` per field of `cls` (all default to None = not given)."""
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        base = _base_type(hints[field.name])
        if base is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=field.name, default=None, help=help_text)


def load_config(
    cls: type[T],
    *,
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    env_prefix: str = ENV_PREFIX,
) -> T:
    """Build a `cls` from defaults, then the TOML file, then `env_prefix`* variables (FEDLINK_*
    unless a command needs its own namespace), then overrides.

    Overrides with value None are ignored, so a parsed argparse Namespace can be passed as-is.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_toml(path, names))
    for name in names:
        key = env_prefix + name.upper()
        if key in environ:
            values[name] = environ[key]
    for name, value in (overrides or {}).items():
        if name in names and value is not None:
            values[name] = value
    converted = {name: _convert(name, value, hints[name]) for name, value in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _read_toml(path: Path, names: set[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {path}; valid keys: {', '.join(sorted(names))}"
        )
    return data


def _base_type(hint: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _table(value: Any) -> dict[str, Any]:
    """A TOML table as it is, or `key=value,...` from a variable or flag, each value read as a
    TOML value (a number, true/false, a quoted string) or else taken as a bare string."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a table or key=value,..., got {value!r}")
    table: dict[str, Any] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        key, sep, text = (piece.strip() for piece in item.partition("="))
        if not sep or not key or key in table:
            raise ValueError(f"{item!r} is not a new key=value")
        try:
            table[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            table[key] = text
    return table


def _convert(name: str, value: Any, hint: Any) -> Any:
    optional = type(None) in typing.get_args(hint)
    base = _base_type(hint)
    if optional and (value is None or value == ""):
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if base is Path:
            return Path(value)
        if base is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
        if typing.get_origin(base) is dict:
            return _table(value)
        if typing.get_origin(base) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {name}: {exc}") from None
    raise ConfigError(f"{name}: unsupported config type {hint}")  # a programming error
