"""The causal-lm task (transformers + peft, a tiny GPT-2 built from a config, no download): a
LoRA federation over mTLS that exchanges only the adapters."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.client.app import FederationClient
from fedlink.client.config import ClientConfig
from fedlink.common.tasks import load_task
from fedlink.common.tensors import open_state_file

pytest.importorskip("peft")

TEXTS = {
    "site-0": ["the quick brown fox jumps over the lazy dog. " * 4] * 12,
    "site-1": ["federated learning keeps data where it lives. " * 4] * 12,
}


def test_a_lora_federation_exchanges_only_the_adapters(
    pki: Any, start_coordinator: Any, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    initial = load_task("causal-lm").build_model().state_dict()
    full_bytes = sum(t.numel() * t.element_size() for t in initial.values())
    coordinator = start_coordinator(
        initial,
        task="causal-lm",
        num_rounds=2,
        min_clients=2,
        min_fit_clients=2,
        optimizer="adamw",
        learning_rate=0.01,
        batch_size=4,
        exchanged_tensors=("*lora_*",),
    )
    clients = []
    for name, texts in TEXTS.items():
        data = tmp_path / name
        data.mkdir()
        (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cert, key, ca = pki.client(name)
        config = ClientConfig(
            server=coordinator.address,
            cert=cert,
            key=key,
            ca=ca,
            task="causal-lm",
            data_dir=data,
            threads=1,
            device="cpu",
            spool_dir=tmp_path,
        )
        clients.append(FederationClient(config))
    codes: dict[int, int] = {}
    threads = [
        threading.Thread(target=lambda i=i, c=c: codes.update({i: c.run()}))
        for i, c in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert codes == {0: 0, 1: 0}
    summary = coordinator.summary(timeout=300)
    record = summary.last_record
    assert summary.completed and record is not None and record.clients_accepted == 2
    assert record.federated_loss is not None and record.federated_metrics["perplexity"] > 1
    with open_state_file(summary.final_model) as final:
        assert final and all("lora_" in name for name in final)
        lora_b = [name for name in final if "lora_B" in name]
        assert any(bool(final[name].abs().sum() > 0) for name in lora_b), "B starts at 0"
    # Issue 17's target: a round moves at most 2% of the full model, each way, per client.
    assert record.bytes_up / 2 <= 0.02 * full_bytes
    assert record.bytes_down / 2 <= 0.02 * full_bytes
