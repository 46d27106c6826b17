"""The digits-transfer task (common/tasks/digits_transfer.py): a pretrained backbone loaded from
a safetensors file and checked, digits as 28x28 images, and the pretraining command."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlink.common.errors import TaskError
from fedlink.common.partial import frozen_digest
from fedlink.common.tasks import digits_transfer, fashion_mnist, load_task
from fedlink.common.tasks.base import DataRequest, TrainConfig
from fedlink.common.tensors import StateDict, open_state_file, save_state_file

CPU = torch.device("cpu")


def _backbone(seed: int) -> StateDict:
    generator = torch.Generator().manual_seed(seed)
    shapes = digits_transfer.Backbone().state_dict()
    return {name: 0.1 * torch.randn(t.shape, generator=generator) for name, t in shapes.items()}


def _build(monkeypatch: pytest.MonkeyPatch, path: Path) -> torch.nn.Module:
    monkeypatch.setenv(digits_transfer.BACKBONE_ENV, str(path))
    return load_task("digits-transfer").build_model()


def test_the_pretrained_backbone_is_loaded_and_only_the_head_trains_when_only_it_travels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrained = _backbone(1)
    save_state_file(pretrained, tmp_path / "backbone.safetensors")
    model = _build(monkeypatch, tmp_path / "backbone.safetensors")
    state = model.state_dict()
    for name, tensor in pretrained.items():
        assert torch.equal(state[f"backbone.{name}"], tensor), name
    head = {name: t.clone() for name, t in state.items() if name.startswith("head.")}
    digits_transfer.HEAD_ONLY.freeze(model)  # what a client does with exchanged_tensors head.*
    data = digits_transfer.load_data(DataRequest(num_partitions=5))
    digits_transfer.train(model, data, TrainConfig(learning_rate=0.05), CPU)
    after = model.state_dict()
    for name, tensor in pretrained.items():
        assert torch.equal(after[f"backbone.{name}"], tensor), name
    assert not torch.equal(after["head.weight"], head["head.weight"])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x80\x04not a safetensors file at all")


def _reshaped(path: Path) -> None:
    save_state_file({**_backbone(1), "fc.weight": torch.zeros(64, 1568)}, path)


def _missing(path: Path) -> None:
    save_state_file({k: v for k, v in _backbone(1).items() if k != "conv2.bias"}, path)


def _extra(path: Path) -> None:
    save_state_file({**_backbone(1), "head.weight": torch.zeros(10, 128)}, path)


def _not_finite(path: Path) -> None:
    save_state_file({**_backbone(1), "conv1.bias": torch.full((16,), float("nan"))}, path)


def _retyped(path: Path) -> None:
    save_state_file({**_backbone(1), "conv1.bias": torch.zeros(16, dtype=torch.float16)}, path)


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (None, "which is not a file"),
        (_garbage, "is not a safetensors file"),
        (_reshaped, "'fc.weight' is float32 [64, 1568], the backbone's float32 [128, 1568]"),
        (_missing, "it has no tensor 'conv2.bias' ([32])"),
        (_extra, "its tensor 'head.weight' is not part of the backbone"),
        (_not_finite, "'conv1.bias' holds values that are not finite"),
        (_retyped, "'conv1.bias' is float16 [16], the backbone's float32 [16]"),
    ],
)
def test_a_backbone_file_that_is_missing_not_safetensors_or_of_another_shape_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: object, problem: str
) -> None:
    path = tmp_path / "backbone.safetensors"
    if callable(write):
        write(path)
    with pytest.raises(TaskError) as refused:
        _build(monkeypatch, path)
    message = str(refused.value)
    assert problem in message
    assert digits_transfer.BACKBONE_ENV in message and "--out FILE" in message


def test_without_a_backbone_file_every_site_draws_the_same_untrained_backbone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(digits_transfer.BACKBONE_ENV, raising=False)
    torch.manual_seed(1)
    one = digits_transfer.build_model().state_dict()
    torch.manual_seed(2)
    two = digits_transfer.build_model().state_dict()
    assert frozen_digest(digits_transfer.HEAD_ONLY.frozen(one)) == frozen_digest(
        digits_transfer.HEAD_ONLY.frozen(two)
    )
    assert not torch.equal(one["head.weight"], two["head.weight"])  # the run's seed draws it


def test_the_digits_become_centred_28x28_images_normalised_like_fashion_mnist() -> None:
    test = digits_transfer.load_test_data()
    images = test.features  # type: ignore[attr-defined]
    assert images.shape == (360, 1, 28, 28)
    background = -fashion_mnist.MEAN / fashion_mnist.STD
    border = torch.cat([images[..., :4, :].flatten(), images[..., :, -4:].flatten()])
    assert torch.allclose(border, torch.full_like(border, background))
    assert float(images.max()) == pytest.approx((1 - fashion_mnist.MEAN) / fashion_mnist.STD)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_images(folder: Path, train: int, test: int) -> None:
    """Random 28x28 images in the IDX files MNIST and Fashion-MNIST come in."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_with_a_data_dir_the_sites_train_on_mnist_normalised_like_fashion_mnist(
    tmp_path: Path,
) -> None:
    _write_images(tmp_path / "MNIST" / "raw", train=40, test=10)
    data = digits_transfer.load_data(DataRequest(data_dir=tmp_path))
    images = data.train.features  # type: ignore[attr-defined]
    assert images.shape == (40 - 4, 1, 28, 28)
    raw = (images * fashion_mnist.STD + fashion_mnist.MEAN) * 255
    assert torch.allclose(raw, raw.round(), atol=1e-3) and float(raw.max()) <= 255.001
    assert len(digits_transfer.load_test_data(tmp_path)) == 10  # type: ignore[arg-type]


def test_pretraining_writes_the_backbone_as_safetensors_and_prints_the_hash_to_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_images(tmp_path, train=64, test=16)
    out = tmp_path / "backbone.safetensors"
    argv = ["--out", str(out), "--data-dir", str(tmp_path), "--epochs", "1", "--device", "cpu"]
    assert digits_transfer.main(argv) == 0
    with open_state_file(out) as written:
        assert sorted(written) == sorted(digits_transfer.Backbone().state_dict())
    pinned = re.search(r'frozen_sha256 = "([0-9a-f]{64})"', capsys.readouterr().out)
    assert pinned is not None
    # The hash a coordinator that loads this file computes, and refuses to start without.
    coordinator = digits_transfer.HEAD_ONLY.frozen(_build(monkeypatch, out).state_dict())
    assert frozen_digest(coordinator).hex() == pinned.group(1)
    assert digits_transfer.main([*argv[:2], "--data-dir", str(tmp_path / "none")]) == 2
