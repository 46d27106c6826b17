"""A fedlink task whose training is a no-op, for transport benchmarks.

The model is chosen by the FEDLINK_BENCH_MODEL environment variable (see MODELS). Clients still
download the global model, load it into their model, serialize its state_dict and upload it:
only the compute is skipped. There is no centralized test set, so the coordinator only
transports and aggregates.

Import it as the task `noop_task` with this directory on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    EvalResult,
    ExampleDataset,
    TensorExamples,
    TrainConfig,
    TrainResult,
)
from fedlink.common.tensors import encode_state

MODEL_ENV = "FEDLINK_BENCH_MODEL"
# Seconds this client's "training" takes (default none): set per client by the transport
# benchmark's --train-spread, so that uploads end spread out as in a real round.
TRAIN_SECONDS_ENV = "FEDLINK_BENCH_TRAIN_SECONDS"
DEFAULT_MODEL = "cnn1.66m"
# Examples each client reports per round (its FedAvg weight).
NUM_EXAMPLES = 100
# The 100M model: LAYERS square Linear layers of WIDTH features (weights and biases).
WIDTH = 5000
LAYERS = 4


class Big(nn.Module):
    """`layers` x Linear(WIDTH, WIDTH): with LAYERS, 100,020,000 float32 parameters (400 MB)."""

    def __init__(self, layers: int = LAYERS) -> None:
        super().__init__()
        # Built on the meta device, then given real memory: skips the slow random init.
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, device="meta") for _ in range(layers))
        self.to_empty(device="cpu")
        with torch.no_grad():
            # to_empty leaves memory uninitialized (possibly NaN, which fedlink refuses); a
            # constant fill is fast and makes every page resident, as trained weights would be.
            for parameter in self.parameters():
                parameter.fill_(1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# torchvision (also imported by fedlink's mnist task) is imported only by the models that need
# it: ~160 MiB of the coordinator's memory would otherwise be the benchmark task's, not fedlink's.


def _tiny_mlp() -> nn.Module:
    """64 -> 32 -> 10 (2,410 parameters, about 10 KB on the wire): for soak and load tests, where
    the coordinator's own overhead per round and per client is what is measured."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _fedavg_cnn() -> nn.Module:
    from fedlink.common.tasks.mnist import FedAvgCNN

    return FedAvgCNN()


def _resnet18() -> nn.Module:
    import torchvision

    model: nn.Module = torchvision.models.resnet18(num_classes=10)
    return model


def _big_1gib() -> nn.Module:
    """11 of the 100m model's layers: 275,055,000 parameters, 1.02 GiB as safetensors."""
    return Big(layers=11)


MODELS = {
    "tiny": _tiny_mlp,
    "cnn1.66m": _fedavg_cnn,
    "resnet18": _resnet18,
    "100m": Big,
    "1gib": _big_1gib,
}


def model_name() -> str:
    name = os.environ.get(MODEL_ENV, DEFAULT_MODEL)
    if name not in MODELS:
        raise ValueError(f"{MODEL_ENV}={name!r}; choose one of {', '.join(MODELS)}")
    return name


def build_model() -> nn.Module:
    return MODELS[model_name()]()


def load_data(request: DataRequest) -> ClientData:
    features = torch.zeros(NUM_EXAMPLES, 1)
    return ClientData(train=TensorExamples(features, torch.zeros(NUM_EXAMPLES)))


def load_test_data() -> ExampleDataset | None:
    return None


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    time.sleep(float(os.environ.get(TRAIN_SECONDS_ENV, "0")))
    return TrainResult(num_examples=NUM_EXAMPLES, loss=0.0)


def evaluate(model: nn.Module, dataset: ExampleDataset, device: torch.device) -> EvalResult:
    return EvalResult(num_examples=NUM_EXAMPLES, loss=0.0, accuracy=0.0)


def describe_model(name: str) -> dict[str, object]:
    """Parameter count and safetensors size (the bytes fedlink streams) of one model."""
    model = MODELS[name]()
    return {
        "name": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "payload_bytes": len(encode_state(model.state_dict())),
        "num_examples": NUM_EXAMPLES,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    # `python noop_task.py MODEL`: one JSON line, so the benchmark driver never imports torch
    # (a child's ru_maxrss includes its parent's RSS at fork time).
    print(json.dumps(describe_model(sys.argv[1])))
