"""Tests that docs/configuration.md documents every setting and that its samples load."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedlink.client.config import ClientConfig
from fedlink.common.config import load_config
from fedlink.health import HealthConfig
from fedlink.server.config import ServerConfig
from fedlink.simulation.config import SimulationConfig
from fedlink.status import AdminConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SECTIONS = {
    ServerConfig: "Coordinator",
    ClientConfig: "Client",
    SimulationConfig: "Simulation",
    HealthConfig: "Health check",
    AdminConfig: "Admin",
}
ENV_PREFIXES = {
    ServerConfig: "FEDLINK_",
    ClientConfig: "FEDLINK_",
    SimulationConfig: "FEDLINK_",
    HealthConfig: "FEDLINK_HEALTH_",
    AdminConfig: "FEDLINK_ADMIN_",
}
SAMPLES = {ServerConfig: "server.toml", ClientConfig: "client.toml"}


def _sections() -> dict[str, str]:
    """`## heading` -> the text under it, up to the next `##` heading."""
    parts = re.split(r"^## (.+)$", DOC.read_text(), flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def _section(prefix: str) -> str:
    matches = [body for heading, body in _sections().items() if heading.startswith(prefix)]
    assert len(matches) == 1, f"expected one '## {prefix}...' section in {DOC}"
    return matches[0]


def _table_rows(section: str) -> dict[str, list[str]]:
    """First cell (TOML key, without backticks) -> all cells, for each row of the field table."""
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def _toml_blocks(section: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def _documented_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Mapping):
        return f"`{dict(value)}`"  # a table: `{}`
    if isinstance(value, tuple):
        return f"`{list(value)}`"  # a TOML list
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


@pytest.mark.parametrize("cls", list(SECTIONS))
def test_every_field_name_appears_in_the_doc(cls: type[Any]) -> None:
    text = DOC.read_text()
    missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in text]
    assert missing == [], f"document {missing} in {DOC}"


@pytest.mark.parametrize("cls", list(SECTIONS))
def test_field_table_lists_exactly_the_fields_with_flag_env_and_default(cls: type[Any]) -> None:
    rows = _table_rows(_section(SECTIONS[cls]))
    bases = [base for base in cls.__bases__ if dataclasses.is_dataclass(base)]
    inherited = {f.name for base in bases for f in dataclasses.fields(base)}
    # A simulation's table lists only what it adds to the coordinator's settings.
    fields = [f for f in dataclasses.fields(cls) if f.name not in inherited]
    assert list(rows) == [f.name for f in fields], "table rows must follow the dataclass fields"
    for field in fields:
        _, flag, env, _, default, meaning = rows[field.name]
        assert flag == f"`--{field.name.replace('_', '-')}`"
        assert env == f"`{ENV_PREFIXES[cls]}{field.name.upper()}`"
        value = (
            field.default
            if field.default_factory is dataclasses.MISSING
            else field.default_factory()
        )
        assert default.startswith(_documented_default(value)), field.name
        assert meaning, field.name


def test_precedence_rule_is_documented_in_the_order_load_config_applies() -> None:
    section = _section("Precedence")
    order = [section.index(word) for word in ("command-line", "environment", "TOML", "default")]
    assert order == sorted(order)


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig])
def test_sample_toml_parses_and_loads(cls: type[Any], tmp_path: Path) -> None:
    blocks = _toml_blocks(_section(f"Sample `{SAMPLES[cls]}`"))
    assert len(blocks) == 1
    path = tmp_path / SAMPLES[cls]
    path.write_text(blocks[0])
    config = load_config(cls, path=path, environ={})
    assert isinstance(config, cls)
    # Samples show a real deployment: mutual TLS, never the development shortcut.
    assert config.insecure is False
    assert config.cert is not None and config.key is not None and config.ca is not None


def test_doc_has_no_other_toml_blocks() -> None:
    # Every TOML example is one of the two samples, so every one is checked above.
    assert len(_toml_blocks(DOC.read_text())) == len(SAMPLES)
