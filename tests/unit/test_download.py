"""A downloaded global model written straight into the client's tensors (client/download.py),
and the spool it falls back to for anything that does not map onto them one to one."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedlink.client.config import ClientConfig
from fedlink.client.download import ModelSink, descriptor_path, nameless_spool
from fedlink.client.site import LocalSite
from fedlink.common.tensors import HEADER_BYTES_BASE, StateDict, encode_state, open_state_file
from fedlink.v1 import federation_pb2 as pb


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )


def _sent(model: torch.nn.Module) -> tuple[StateDict, bytes]:
    """Another model's state (the coordinator's), with every value changed, as sent."""
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for tensor in state.values():
        tensor.add_(7)  # integers too (num_batches_tracked)
    return state, encode_state(state)


class _Spool:
    def __init__(self) -> None:
        self.file: io.BytesIO | None = None

    def __call__(self) -> io.BytesIO:
        self.file = io.BytesIO()
        return self.file


def _feed(sink: ModelSink, payload: bytes, chunk: int) -> None:
    for start in range(0, len(payload), chunk):
        sink.write(memoryview(payload)[start : start + chunk])


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_a_download_lands_in_the_models_own_tensors_whatever_the_chunk_size(chunk: int) -> None:
    model = _model()
    sent, payload = _sent(model)
    weight = model[0].weight
    spool = _Spool()
    sink = ModelSink(model.state_dict(), len(payload), spool)
    _feed(sink, payload, chunk)
    assert sink.in_place and spool.file is None  # no file, no second copy
    assert model[0].weight is weight  # the same parameter, now holding the sent values
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, sent[name]), name


def _spooled(targets: StateDict | None, payload: bytes) -> ModelSink:
    spool = _Spool()
    sink = ModelSink(targets, len(payload), spool)
    _feed(sink, payload, 5)
    assert not sink.in_place
    assert spool.file is not None and spool.file.getvalue() == payload  # every byte, in order
    return sink


def _without_first(state: StateDict) -> StateDict:
    return dict(list(state.items())[1:])


def _tied(state: StateDict) -> StateDict:
    weight = state["3.weight"]
    return {**state, "3.bias": weight.view(-1)[: state["3.bias"].numel()]}


@pytest.mark.parametrize(
    "targets_of",
    [
        lambda state: None,  # the site asked for the spool (a GPU model, SCAFFOLD, load hooks)
        _without_first,  # the coordinator sends a tensor the model does not exchange
        lambda state: {**state, "0.weight": state["0.weight"].double()},  # another dtype
        lambda state: {**state, "0.weight": state["0.weight"].reshape(-1)},  # another shape
        _tied,  # two names over one memory
    ],
    ids=["no-targets", "other-names", "other-dtype", "other-shape", "shared-memory"],
)
def test_a_download_that_does_not_map_onto_the_tensors_goes_whole_to_the_spool(
    targets_of: Callable[[StateDict], StateDict | None],
) -> None:
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    _, payload = _sent(model)
    _spooled(targets_of(model.state_dict()), payload)
    for name, tensor in model.state_dict().items():  # nothing was written into the model
        assert torch.equal(tensor, before[name]), name


def test_a_non_contiguous_tensor_is_never_written_in_place() -> None:
    payload = encode_state({"w": torch.ones(3, 2)})
    target = {"w": torch.zeros(2, 3).t()}  # shape (3, 2), strides of its transpose
    _spooled(target, payload)
    assert torch.equal(target["w"], torch.zeros(3, 2))


def test_bytes_beyond_the_last_tensor_are_left_to_the_spool() -> None:
    model = _model()
    _, payload = _sent(model)
    _spooled(model.state_dict(), payload + bytes(8))  # safetensors refuses trailing bytes


def test_a_header_longer_than_the_limit_is_left_to_the_spool() -> None:
    state = {"x" * (HEADER_BYTES_BASE + 2048): torch.ones(2)}
    _spooled({name: torch.zeros(2) for name in state}, encode_state(state))


def _site() -> LocalSite:
    # No connection is made: the site is the model and the data.
    return LocalSite(
        ClientConfig(task="digits", num_partitions=4, device="cpu", threads=1, insecure=True)
    )


def test_a_site_will_not_train_or_evaluate_a_model_whose_download_did_not_complete() -> None:
    site = _site()
    header = pb.TaskHeader(round=1, seed=1)
    site.begin_download()
    with pytest.raises(RuntimeError, match="did not complete"):
        site.train(header)
    with pytest.raises(RuntimeError, match="did not complete"):
        site.evaluate(header)
    site.loaded_in_place()
    site.evaluate(header)


def test_a_model_with_load_hooks_is_loaded_through_load_state_dict() -> None:
    site = _site()
    assert site.download_targets(with_control=False) is not None
    assert site.download_targets(with_control=True) is None  # SCAFFOLD's c rides along
    site.model.register_load_state_dict_post_hook(lambda module, keys: None)
    assert site.download_targets(with_control=False) is None


def test_the_spool_file_is_read_through_its_descriptor_and_has_no_name(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    with nameless_spool(tmp_path) as spool:
        spool.write(encode_state(state))
        spool.flush()
        assert list(tmp_path.iterdir()) == []
        with open_state_file(descriptor_path(spool)) as loaded:
            assert torch.equal(loaded["w"], state["w"])


def test_a_client_killed_with_sigkill_leaves_no_spool_file_behind(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from fedlink.client.download import nameless_spool\n"
        "spool = nameless_spool(Path(sys.argv[1]))\n"
        "spool.write(bytes(1 << 20))\n"
        "spool.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []
