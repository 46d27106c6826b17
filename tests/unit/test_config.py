"""Tests for configuration: defaults < TOML < FEDLINK_* environment < overrides, and validation."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from fedlink.client.config import ClientConfig
from fedlink.common.config import add_config_arguments, load_config
from fedlink.common.errors import ConfigError
from fedlink.common.wire import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from fedlink.server.config import ServerConfig

DEV = {"FEDLINK_INSECURE": "true"}
TLS = {"cert": "server.pem", "key": "server.key", "ca": "ca.pem"}


def _toml(tmp_path: Path, text: str, name: str = "fedlink.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _server(**overrides: Any) -> ServerConfig:
    return load_config(ServerConfig, overrides={"insecure": True, **overrides}, environ={})


# --- precedence -------------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_given() -> None:
    config = load_config(ServerConfig, environ=DEV)
    assert config.num_rounds == 10
    assert config.listen == "0.0.0.0:50051"
    assert config.cert is None
    assert config.run_dir == Path("fedlink-run")


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    path = _toml(tmp_path, "insecure = true\nnum_rounds = 4\nlearning_rate = 0.5\n")
    config = load_config(ServerConfig, path=path, environ={})
    assert config.num_rounds == 4
    assert config.learning_rate == 0.5
    assert config.batch_size == 32  # untouched default


def test_environment_overrides_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "insecure = true\nnum_rounds = 4\nbatch_size = 8\n")
    config = load_config(ServerConfig, path=path, environ={"FEDLINK_NUM_ROUNDS": "5"})
    assert config.num_rounds == 5
    assert config.batch_size == 8


def test_overrides_beat_environment_and_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "insecure = true\nnum_rounds = 4\n")
    config = load_config(
        ServerConfig,
        path=path,
        environ={"FEDLINK_NUM_ROUNDS": "5"},
        overrides={"num_rounds": "6"},
    )
    assert config.num_rounds == 6


def test_none_overrides_and_unrelated_keys_are_ignored() -> None:
    config = load_config(
        ServerConfig,
        environ={**DEV, "FEDLINK_NUM_ROUNDS": "5"},
        overrides={"num_rounds": None, "config": Path("x.toml"), "command": "server"},
    )
    assert config.num_rounds == 5


def test_environment_is_read_only_from_the_given_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLINK_NUM_ROUNDS", "99")
    assert load_config(ServerConfig, environ=DEV).num_rounds == 10
    monkeypatch.setenv("FEDLINK_INSECURE", "1")
    assert load_config(ServerConfig).num_rounds == 99  # os.environ when none is given


def test_environment_variables_without_prefix_are_ignored() -> None:
    config = load_config(
        ServerConfig, environ={**DEV, "NUM_ROUNDS": "5", "fedlink_num_rounds": "6"}
    )
    assert config.num_rounds == 10


def test_client_config_follows_the_same_precedence(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'insecure = true\nserver = "toml:1"\ndevice = "cpu"\n')
    config = load_config(
        ClientConfig,
        path=path,
        environ={"FEDLINK_SERVER": "env:2", "FEDLINK_DEVICE": "cuda"},
        overrides={"device": "auto"},
    )
    assert config.server == "env:2"
    assert config.device == "auto"


# --- TOML file errors -------------------------------------------------------------------------


def test_unknown_toml_key_is_rejected_listing_valid_keys(tmp_path: Path) -> None:
    path = _toml(tmp_path, "insecure = true\nnum_round = 3\n")
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(ServerConfig, path=path, environ={})
    unknown, valid = str(info.value).split("; valid keys: ")
    assert unknown == f"unknown key(s) num_round in {path}"
    assert valid.split(", ") == sorted(f.name for f in dataclasses.fields(ServerConfig))


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nnum_rounds = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key.*server"):
        load_config(ServerConfig, path=path, environ=DEV)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ServerConfig, path=tmp_path / "absent.toml", environ=DEV)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "num_rounds = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ServerConfig, path=path, environ=DEV)


# --- value conversion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_rounds", "three"),
        ("num_rounds", "2.5"),
        ("num_rounds", 2.5),
        ("num_rounds", True),
        ("learning_rate", "fast"),
        ("learning_rate", False),
        ("insecure", "maybe"),
        ("insecure", 2),
    ],
)
def test_malformed_value_is_a_config_error_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"invalid value for {key}"):
        load_config(ServerConfig, environ=DEV, overrides={key: value})


def test_malformed_toml_value_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'insecure = true\nbatch_size = "big"\n')
    with pytest.raises(ConfigError, match="invalid value for batch_size"):
        load_config(ServerConfig, path=path, environ={})


def test_string_field_refuses_a_toml_number(tmp_path: Path) -> None:
    path = _toml(tmp_path, "insecure = true\ntask = 5\n")
    with pytest.raises(ConfigError, match="invalid value for task"):
        load_config(ServerConfig, path=path, environ={})


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "yes", "on", " On "])
def test_truthy_strings_enable_a_bool(text: str) -> None:
    assert load_config(ServerConfig, environ={"FEDLINK_INSECURE": text}).insecure is True


@pytest.mark.parametrize("text", ["0", "false", "no", "off"])
def test_falsy_strings_disable_a_bool(text: str) -> None:
    tls_env = {"FEDLINK_CERT": "c.pem", "FEDLINK_KEY": "c.key", "FEDLINK_CA": "ca.pem"}
    config = load_config(ClientConfig, environ={"FEDLINK_INSECURE": text, **tls_env})
    assert config.insecure is False


def test_numbers_are_parsed_from_strings_and_toml_floats(tmp_path: Path) -> None:
    path = _toml(tmp_path, "insecure = true\nnum_rounds = 7.0\nfraction_fit = 1\n")
    config = load_config(ServerConfig, path=path, environ={"FEDLINK_LEARNING_RATE": "1e-3"})
    assert config.num_rounds == 7
    assert isinstance(config.num_rounds, int)
    assert config.fraction_fit == 1.0
    assert isinstance(config.fraction_fit, float)
    assert config.learning_rate == 0.001


def test_paths_are_converted_from_strings(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'run_dir = "out/run"\ncert = "pki/server.pem"\n')
    config = load_config(
        ServerConfig,
        path=path,
        environ={"FEDLINK_KEY": "pki/server.key", "FEDLINK_STATE_DIR": "/var/fedlink"},
        overrides={"ca": "pki/ca.pem"},
    )
    assert config.run_dir == Path("out/run")
    assert config.state_dir == Path("/var/fedlink")
    assert config.cert == Path("pki/server.pem")
    assert config.key == Path("pki/server.key")
    assert config.ca == Path("pki/ca.pem")
    assert all(isinstance(p, Path) for p in (config.cert, config.key, config.ca, config.run_dir))


def test_empty_string_clears_an_optional_value() -> None:
    config = load_config(
        ServerConfig,
        environ={**DEV, "FEDLINK_ADDRESS_FILE": "addr.txt"},
        overrides={"address_file": ""},
    )
    assert config.address_file is None


def test_optional_string_is_kept_when_given() -> None:
    config = load_config(ClientConfig, environ={**DEV, "FEDLINK_SERVER_NAME": "coordinator"})
    assert config.server_name == "coordinator"
    assert load_config(ClientConfig, environ=DEV).server_name is None


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_server_without_tls_material_or_insecure_points_to_fedlink_certs(missing: str) -> None:
    given = {k: v for k, v in TLS.items() if k != missing}
    with pytest.raises(ConfigError, match="fedlink certs"):
        load_config(ServerConfig, overrides=given, environ={})


def test_server_with_cert_key_and_ca_needs_no_insecure_flag() -> None:
    config = load_config(ServerConfig, overrides=TLS, environ={})
    assert config.insecure is False
    assert config.ca == Path("ca.pem")


def test_client_without_tls_material_or_insecure_points_to_fedlink_certs() -> None:
    with pytest.raises(ConfigError, match="fedlink certs issue"):
        load_config(ClientConfig, environ={})


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.0001, 2])
def test_fraction_fit_outside_zero_to_one_is_rejected(fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction_fit"):
        _server(fraction_fit=fraction)


@pytest.mark.parametrize("fraction", [0.01, 0.5, 1.0])
def test_fraction_fit_inside_zero_to_one_is_accepted(fraction: float) -> None:
    assert _server(fraction_fit=fraction).fraction_fit == fraction


@pytest.mark.parametrize("chunk_size", [0, MIN_CHUNK_SIZE - 1, MAX_CHUNK_SIZE + 1])
def test_chunk_size_out_of_range_is_rejected(chunk_size: int) -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        _server(chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE])
def test_chunk_size_at_bounds_is_accepted(chunk_size: int) -> None:
    assert _server(chunk_size=chunk_size).chunk_size == chunk_size


@pytest.mark.parametrize(
    "field",
    [
        "num_rounds",
        "min_clients",
        "min_fit_clients",
        "local_epochs",
        "batch_size",
        "max_num_examples",
        "rate_limit_burst",
        "max_calls_per_client",
        "max_concurrent_rpcs",
        "keep_checkpoints",
    ],
)
def test_counts_below_one_are_rejected_naming_the_field(field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be at least 1"):
        _server(**{field: 0})


def test_min_results_above_min_fit_clients_is_rejected() -> None:
    with pytest.raises(ConfigError, match="min_results cannot exceed min_fit_clients"):
        _server(min_results=3, min_fit_clients=2)


@pytest.mark.parametrize(
    "overrides",
    [
        {"round_timeout_seconds": 0},
        {"heartbeat_interval_seconds": -1},
        {"learning_rate": 0},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"evaluate_every": -1},
        {"max_round_retries": -1},
        {"liveness_timeout_seconds": float("nan")},
        {"finished_grace_seconds": -1},
        {"finished_grace_seconds": float("nan")},
        {"finished_grace_seconds": float("inf")},
        {"below_quorum": "hope"},
        {"log_format": "xml"},
    ],
)
def test_out_of_range_server_values_are_rejected(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        _server(**overrides)


def test_max_workers_is_automatic_at_zero_and_never_negative() -> None:
    assert _server().max_workers == 0
    with pytest.raises(ConfigError, match=r"max_workers must be 0 \(automatic\) or positive"):
        _server(max_workers=-1)


def test_no_grace_after_a_finished_run_is_allowed() -> None:
    assert _server(finished_grace_seconds=0).finished_grace_seconds == 0


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (ServerConfig, "learning_rate"),
        (ServerConfig, "round_timeout_seconds"),
        (ServerConfig, "heartbeat_interval_seconds"),
        (ClientConfig, "reconnect_timeout_seconds"),
    ],
)
def test_nan_for_a_positive_float_is_rejected(cls: type[Any], field: str) -> None:
    with pytest.raises(ConfigError):
        load_config(cls, environ={**DEV, f"FEDLINK_{field.upper()}": "nan"})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:-1"}, "device must be"),
        ({"device": "cuda:x"}, "device must be"),
        ({"device": "cuda:0 "}, "device must be"),
        ({"threads": -1}, "threads must be 0"),
        ({"num_partitions": 0}, "partition_index"),
        ({"num_partitions": 3, "partition_index": 3}, "partition_index must be in 0..2"),
        ({"partition_index": -1}, "partition_index"),
        ({"reconnect_timeout_seconds": 0}, "reconnect_timeout_seconds"),
    ],
)
def test_out_of_range_client_values_are_rejected(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(ClientConfig, environ=DEV, overrides=overrides)


def test_a_numbered_gpu_is_a_valid_client_device() -> None:
    for device in ("cuda", "cuda:0", "cuda:7"):
        assert load_config(ClientConfig, environ=DEV, overrides={"device": device}).device == device


def test_allowed_clients_is_a_toml_list_or_a_comma_separated_string(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'allowed_clients = ["site-a", "site-b"]\n')
    from_file = load_config(ServerConfig, path=path, overrides=TLS, environ={})
    assert from_file.allowed_clients == ("site-a", "site-b")
    from_env = load_config(
        ServerConfig, overrides=TLS, environ={"FEDLINK_ALLOWED_CLIENTS": "site-a, site-c"}
    )
    assert from_env.allowed_clients == ("site-a", "site-c")


def test_an_allowed_client_that_cannot_be_a_certificate_name_is_rejected() -> None:
    with pytest.raises(ConfigError, match="allowed_clients: invalid certificate name 'a b'"):
        load_config(ServerConfig, overrides={**TLS, "allowed_clients": ("a b",)}, environ={})


@pytest.mark.parametrize(
    "overrides", [{"allowed_clients": ("site-a",)}, {"revocation_list": "crl.pem"}]
)
def test_access_control_needs_tls(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="cannot be used with --insecure"):
        _server(**overrides)


@pytest.mark.parametrize("rate", ["0", "-1", "nan", "inf"])
def test_rate_limit_must_be_a_positive_number(rate: str) -> None:
    with pytest.raises(ConfigError, match="rate_limit_per_second"):
        load_config(ServerConfig, environ={**DEV, "FEDLINK_RATE_LIMIT_PER_SECOND": rate})


def test_task_config_sends_training_hyperparameters_as_strings() -> None:
    config = _server(local_epochs=2, batch_size=16, learning_rate=0.1, momentum=0.0)
    assert config.hyperparameters() == {
        "local_epochs": "2",
        "batch_size": "16",
        "learning_rate": "0.1",
        "momentum": "0.0",
        "weight_decay": "0.0",
        "optimizer": "sgd",
    }


def test_task_config_comes_from_a_toml_table_as_plain_values(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'insecure = true\n[task_config]\nmu = 0.01\nmode = "fast"\nlayers = 3\nflag = true\n'
    )
    config = load_config(ServerConfig, path=path, environ={})
    assert dict(config.task_config) == {"mu": 0.01, "mode": "fast", "layers": 3, "flag": True}
    with pytest.raises(TypeError):
        config.task_config["mu"] = 1.0  # type: ignore[index]  # read-only: the checked copy


def test_task_config_from_a_flag_or_variable_is_an_inline_table() -> None:
    environ = {**DEV, "FEDLINK_TASK_CONFIG": 'mu = 0.5, mode = "slow"'}
    assert dict(load_config(ServerConfig, environ=environ).task_config) == {
        "mu": 0.5,
        "mode": "slow",
    }
    with pytest.raises(ConfigError, match="invalid value for task_config"):
        load_config(ServerConfig, environ={**DEV, "FEDLINK_TASK_CONFIG": "mu ="})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[task_config]\nwhen = 2024-01-01\n", "'when' is a date"),
        ("[task_config]\nlayers = [1, 2]\n", "'layers' is a list"),
        ("[task_config.nested]\nx = 1\n", "'nested' is a dict"),
        ("[task_config]\nbig = nan\n", "not a finite number"),
        ('[task_config]\ntext = "' + "x" * 2000 + '"\n', "at most 1024"),
    ],
)
def test_task_config_refuses_anything_but_plain_values(
    tmp_path: Path, table: str, message: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text("insecure = true\n" + table)
    with pytest.raises(ConfigError, match=message):
        load_config(ServerConfig, path=path, environ={})


def test_optimizer_and_weight_decay_are_checked() -> None:
    assert _server(optimizer="adam", weight_decay=0.01).hyperparameters()["optimizer"] == "adam"
    with pytest.raises(ConfigError, match="optimizer must be one of sgd, adam, adamw"):
        _server(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="weight_decay must be in"):
        _server(weight_decay=-1.0)


# --- command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig])
def test_every_field_has_a_command_line_flag(cls: type[Any]) -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert "--config" in flags
    for field in dataclasses.fields(cls):
        assert "--" + field.name.replace("_", "-") in flags, field.name
    defaults = vars(parser.parse_args([]))
    assert all(defaults[field.name] is None for field in dataclasses.fields(cls))


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig])
def test_every_flag_shows_the_fields_help_text(cls: type[Any]) -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    by_dest = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(cls):
        assert field.metadata["help"], field.name
        assert by_dest[field.name].help == field.metadata["help"]


def test_parsed_flags_become_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServerConfig)
    args = parser.parse_args(["--num-rounds", "3", "--insecure", "--run-dir", "out"])
    config = load_config(ServerConfig, path=args.config, overrides=vars(args), environ={})
    assert config.num_rounds == 3
    assert config.insecure is True
    assert config.run_dir == Path("out")
    assert config.batch_size == 32


def test_flags_beat_the_config_file_and_environment(tmp_path: Path) -> None:
    path = _toml(tmp_path, "insecure = true\nnum_rounds = 4\nbatch_size = 8\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServerConfig)
    args = parser.parse_args(["--config", str(path), "--num-rounds", "3"])
    config = load_config(
        ServerConfig,
        path=args.config,
        overrides=vars(args),
        environ={"FEDLINK_NUM_ROUNDS": "5", "FEDLINK_BATCH_SIZE": "9"},
    )
    assert config.num_rounds == 3
    assert config.batch_size == 9


def test_no_flag_turns_off_a_bool_set_in_the_environment() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ClientConfig)
    args = parser.parse_args(
        ["--no-insecure", "--cert", "c.pem", "--key", "c.key", "--ca", "ca.pem"]
    )
    config = load_config(ClientConfig, overrides=vars(args), environ=DEV)
    assert config.insecure is False
    assert config.cert == Path("c.pem")


def test_a_liveness_timeout_shorter_than_two_heartbeats_is_rejected() -> None:
    with pytest.raises(ConfigError, match="at least twice heartbeat_interval_seconds"):
        _server(heartbeat_interval_seconds=10, liveness_timeout_seconds=15)


def test_an_aggregation_rule_needing_more_updates_than_the_quorum_is_rejected() -> None:
    with pytest.raises(ConfigError, match="needs at least 5 updates per round"):
        _server(aggregation="krum,f=1", min_results=2, min_fit_clients=4)
    assert _server(aggregation="krum,f=1", min_results=5, min_fit_clients=5).aggregation


def test_an_unknown_aggregation_rule_is_rejected_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown aggregation 'mean'"):
        _server(aggregation="mean")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dp_clip_norm": 0}, "dp_clip_norm must be positive"),
        ({"dp_clip_norm": "nan"}, "dp_clip_norm must be positive"),
        ({"dp_clip_norm": 1, "dp_noise_multiplier": 0}, "dp_noise_multiplier must be positive"),
        ({"dp_clip_norm": 1, "dp_delta": 1}, r"dp_delta must be in \(0, 1\)"),
        ({"dp_clip_norm": 1, "dp_max_epsilon": -1}, "dp_max_epsilon must be positive"),
        ({"dp_max_epsilon": 3}, "dp_max_epsilon needs differential privacy"),
        (
            {"dp_clip_norm": 1, "aggregation": "median", "min_results": 2},
            'needs aggregation = "fedavg"',
        ),
        ({"dp_clip_norm": 1, "aggregation": "fedavg,clip=3"}, 'needs aggregation = "fedavg"'),
    ],
)
def test_bad_differential_privacy_settings_are_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _server(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dpsgd_noise_multiplier": 0}, "dpsgd_noise_multiplier must be positive"),
        ({"dpsgd_noise_multiplier": "nan"}, "dpsgd_noise_multiplier must be positive"),
        ({"dpsgd_noise_multiplier": "inf"}, "dpsgd_noise_multiplier must be positive"),
        ({"dpsgd_noise_multiplier": 1, "dpsgd_max_grad_norm": 0}, "dpsgd_max_grad_norm must be"),
        ({"dpsgd_noise_multiplier": 1, "dpsgd_max_grad_norm": "nan"}, "dpsgd_max_grad_norm must"),
        ({"dpsgd_noise_multiplier": 1, "dpsgd_delta": 0}, r"dpsgd_delta must be in \(0, 1\)"),
        ({"dpsgd_noise_multiplier": 1, "dpsgd_delta": 1.5}, r"dpsgd_delta must be in \(0, 1\)"),
    ],
)
def test_bad_dpsgd_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _server(**overrides)


def test_dpsgd_settings_reach_the_clients_only_when_dpsgd_is_on() -> None:
    assert not any(key.startswith("dpsgd") for key in _server().hyperparameters())
    config = load_config(
        ServerConfig,
        environ={**DEV, "FEDLINK_DPSGD_NOISE_MULTIPLIER": "1.1", "FEDLINK_DPSGD_DELTA": "1e-6"},
    )
    sent = config.hyperparameters()
    assert (sent["dpsgd_noise_multiplier"], sent["dpsgd_max_grad_norm"]) == ("1.1", "1.0")
    assert sent["dpsgd_delta"] == "1e-06"


def test_differential_privacy_settings_load_from_the_environment() -> None:
    config = load_config(
        ServerConfig,
        environ={**DEV, "FEDLINK_DP_CLIP_NORM": "0.5", "FEDLINK_DP_MAX_EPSILON": "8"},
    )
    assert (config.dp_clip_norm, config.dp_max_epsilon, config.dp_noise_multiplier) == (0.5, 8, 1)


# --- update codecs ------------------------------------------------------------------------------


def test_an_update_codec_is_refused_with_secure_aggregation_saying_why() -> None:
    with pytest.raises(ConfigError, match="never sees one, only a masked fixed-point sum"):
        _server(secure_aggregation=True, min_fit_clients=3, min_results=3, update_codec="int8")
    with pytest.raises(ConfigError, match="secure_aggregation"):
        _server(secure_aggregation=True, min_fit_clients=3, min_results=3, update_topk=0.1)
    # A codec composes with DP and robust rules: they see the decoded update.
    assert _server(update_codec="int8", dp_clip_norm=1.0).update_codec_spec().name == "int8"
    assert _server(update_codec="bf16", aggregation="median", min_results=3, min_fit_clients=3)


def test_update_codec_settings_come_from_the_environment() -> None:
    config = load_config(
        ServerConfig,
        environ={
            **DEV,
            "FEDLINK_UPDATE_CODEC": "int8",
            "FEDLINK_UPDATE_INT8_BLOCK_SIZE": "0",
            "FEDLINK_UPDATE_TOPK": "0.05",
        },
    )
    codec = config.update_codec_spec()
    assert (codec.name, codec.block_size, codec.topk) == ("int8", 0, 0.05)
    assert codec.encoding == "fedlink-delta/int8+topk"
    with pytest.raises(ConfigError, match="update_codec must be one of"):
        _server(update_codec="int4")


def test_partial_model_settings_are_checked() -> None:
    config = _server(exchanged_tensors=["head.*"], local_tensors=["bn*"], frozen_sha256="ab" * 32)
    assert config.tensor_selection().travels("head.weight")
    assert not config.tensor_selection().travels("bn1.weight")
    with pytest.raises(ConfigError, match="frozen_sha256 must be 64 lowercase hex digits"):
        _server(frozen_sha256="not-a-hash")
