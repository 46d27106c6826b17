"""Built-in task: LoRA fine-tuning of a causal language model (Hugging Face `transformers` and
`peft`, the `llm` extra) on each site's own text; only the adapters travel.

Each site's text is `<data_dir>/train.jsonl`, one JSON object per line with a "text" field
(`<data_dir>/test.jsonl`, if present, is the coordinator's test set). The task declares
`EXCHANGED_TENSORS`: only the LoRA matrices are exchanged and aggregated; the base model is
frozen, loaded by every site itself and checked by hash at join (docs/large-models.md).

The base model: with FEDLINK_CAUSAL_LM_MODEL set, the pretrained checkpoint in that directory
(`AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)`, its tokenizer alongside);
nothing is ever downloaded. Without it, a tiny GPT-2 (2 layers, 128 wide, byte-level tokens)
initialised from a fixed seed, the same on every site: what tests and demos use.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedlink.common.errors import DataUnavailableError, TaskError
from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    EvalResult,
    ExampleDataset,
    TensorExamples,
    TrainConfig,
    TrainResult,
)
from fedlink.common.tasks.training import make_optimizer

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]

# Only the adapters travel (docs/large-models.md); the base model is frozen on every site.
EXCHANGED_TENSORS = ("*lora_*",)
MODEL_ENV = "FEDLINK_CAUSAL_LM_MODEL"
BLOCK_TOKENS = 64
LORA_RANK = 4
# The tiny model: byte-level tokens 0..255, 256 ends a text.
BYTE_VOCAB = 257
END_OF_TEXT = 256
TINY_SEED = 0
MAX_LINE_CHARS = 1 << 20


def _transformers() -> Any:
    try:
        import peft
        import transformers
    except ImportError as error:
        raise TaskError(
            "task causal-lm needs Hugging Face transformers and peft: pip install 'fedlink[llm]'"
        ) from error
    return transformers, peft


def build_model() -> nn.Module:
    """The base model (pretrained, or tiny from a fixed seed) with LoRA adapters on attention."""
    transformers, peft = _transformers()
    checkpoint = os.environ.get(MODEL_ENV)
    if checkpoint:
        base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
        targets = None  # peft's default for the architecture
    else:
        config = transformers.GPT2Config(
            vocab_size=BYTE_VOCAB,
            n_positions=BLOCK_TOKENS,
            n_embd=128,
            n_layer=2,
            n_head=4,
            bos_token_id=END_OF_TEXT,
            eos_token_id=END_OF_TEXT,
        )
        with torch.random.fork_rng():
            torch.manual_seed(TINY_SEED)  # the same "pretrained" weights on every site
            base = transformers.GPT2LMHeadModel(config)
        targets = ["c_attn"]
    lora = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=targets
    )
    model: nn.Module = peft.get_peft_model(base, lora)
    return model


def _encode(texts: list[str]) -> torch.Tensor:
    """Blocks of BLOCK_TOKENS token ids from the texts, each text ended by its end token."""
    checkpoint = os.environ.get(MODEL_ENV)
    ids: list[int] = []
    if checkpoint:
        transformers, _ = _transformers()
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        for text in texts:
            ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    else:
        for text in texts:
            ids += [*text.encode(), END_OF_TEXT]
    blocks = len(ids) // BLOCK_TOKENS
    if blocks == 0:
        raise TaskError(f"the text is shorter than one block of {BLOCK_TOKENS} tokens")
    return torch.tensor(ids[: blocks * BLOCK_TOKENS], dtype=torch.int64).view(blocks, -1)


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_CHARS:
                raise TaskError(f"{path}:{number}: line longer than {MAX_LINE_CHARS} characters")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}:{number}: not JSON: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TaskError(f'{path}:{number}: expected an object with a "text" string')
            texts.append(record["text"])
    return texts


def load_data(request: DataRequest) -> ClientData:
    """This site's `train.jsonl` (its part, when simulating several sites on one file)."""
    if request.data_dir is None:
        raise DataUnavailableError(
            "task causal-lm trains on each site's own text: pass --data-dir DIR with "
            'DIR/train.jsonl, one {"text": ...} object per line'
        )
    path = Path(request.data_dir) / "train.jsonl"
    if not path.is_file():
        raise DataUnavailableError(f"task causal-lm: no {path}")
    texts = _read_jsonl(path)[request.partition_index :: request.num_partitions]
    blocks = _encode(texts)
    return ClientData(train=TensorExamples(blocks, blocks))


def load_test_data(data_dir: Path | None = None) -> ExampleDataset | None:
    """`<data_dir>/test.jsonl` when there is one; no centralized test set otherwise."""
    if data_dir is None or not (Path(data_dir) / "test.jsonl").is_file():
        return None
    blocks = _encode(_read_jsonl(Path(data_dir) / "test.jsonl"))
    return TensorExamples(blocks, blocks)


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    """Next-token cross-entropy on the site's blocks with the coordinator's optimizer (use
    `optimizer = "adamw"`); only the adapters have gradients."""
    model.train()
    optimizer = make_optimizer(model, config)  # frozen weights have no gradient: never stepped
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator)
    total, count = 0.0, 0
    for _ in range(config.local_epochs):
        for tokens, _labels in loader:
            tokens = tokens.to(device)
            optimizer.zero_grad()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(tokens)
            count += len(tokens)
    return TrainResult(num_examples=len(data.train), loss=total / max(count, 1))  # type: ignore[arg-type]


def evaluate(model: nn.Module, dataset: ExampleDataset, device: torch.device) -> EvalResult:
    """Mean next-token loss and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, _labels in DataLoader(dataset, batch_size=32):
            tokens = tokens.to(device)
            total += float(model(input_ids=tokens, labels=tokens).loss) * len(tokens)
            count += len(tokens)
    loss = total / max(count, 1)
    return EvalResult(
        num_examples=count, loss=loss, metrics={"perplexity": math.exp(min(loss, 50))}
    )
