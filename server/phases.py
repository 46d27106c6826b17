"""What a round is made of: the task kinds, what a pulling client is offered, one phase's
bookkeeping (who was asked, what came back), and the records a round leaves. Plain data, shared
by the run loop (rounds.py), the phase machine (board.py), result intake (results.py) and the
secure-aggregation driver (secure_rounds.py)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedlink.common.secagg import SecAggServer
from fedlink.common.secagg_wire import SessionSetup
from fedlink.common.tensors import StateDict
from fedlink.common.wire import PayloadFile, PayloadInfo


class TaskKind(enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    WAIT = "wait"
    STOP = "stop"
    # Secure aggregation's five steps, in order (docs/privacy.md).
    SECAGG_ADVERTISE = "secagg-advertise"
    SECAGG_SHARE_KEYS = "secagg-share-keys"
    SECAGG_MASKED_INPUT = "secagg-masked-input"
    SECAGG_CONSISTENCY = "secagg-consistency"
    SECAGG_UNMASK = "secagg-unmask"


SECURE_STEPS = (
    TaskKind.SECAGG_ADVERTISE,
    TaskKind.SECAGG_SHARE_KEYS,
    TaskKind.SECAGG_MASKED_INPUT,
    TaskKind.SECAGG_CONSISTENCY,
    TaskKind.SECAGG_UNMASK,
)


@dataclass(frozen=True)
class TaskOffer:
    """What a pulling client receives: a header and, for train/evaluate, the global payload."""

    kind: TaskKind
    task_id: str = ""
    round: int = 0
    seed: int = 0
    payload: PayloadFile | None = None
    secagg: SessionSetup | None = None  # for the secure-aggregation steps


@dataclass(frozen=True)
class ResultHeader:
    task_id: str
    round: int
    num_examples: int
    metrics: Mapping[str, float]
    payload: PayloadInfo | None


@dataclass(frozen=True)
class AcceptedUpdate:
    weight: float
    spool: Path  # validated, kept on disk until the round is aggregated


@dataclass
class SecureSession:
    """One attempt at a round under secure aggregation: lives in memory only (never
    checkpointed), so a coordinator restarted mid-round starts the round again with new keys."""

    setup: SessionSetup
    server: SecAggServer
    directory: Path  # the roster, share inboxes and unmasking request served to clients


@dataclass
class Phase:
    """One step of a round (train, evaluate, or a secure-aggregation step): who was asked, what
    came back.

    A participant is offered the task whenever it pulls without having a result in flight or
    done, so a client that crashed or lost its connection mid-round can pick the task up again
    after it restarts. `finished` holds participants with an accepted or rejected result,
    `delivered` those with an accepted one. The phase's quorum is what `below_quorum = "wait"`
    holds it open for.
    """

    kind: TaskKind
    round: int
    task_id: str
    participants: frozenset[str]
    payload: PayloadFile  # the global model the phase works on
    quorum: int = 0
    # What training clients download when it is more than the global model: the model plus
    # the strategy's extra tensors (Strategy.download_tensors).
    download: PayloadFile | None = None
    inboxes: Mapping[str, PayloadFile] = field(default_factory=dict)  # per-client payloads
    secure: SecureSession | None = None
    delivered: set[str] = field(default_factory=set)
    pulled: set[str] = field(default_factory=set)
    submitted: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    open: bool = True
    accepted: dict[str, AcceptedUpdate] = field(default_factory=dict)
    metrics: list[tuple[int, Mapping[str, float]]] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    overdue_logged: bool = False
    validating: int = 0  # results being validated now: the phase closes once there are none
    # Plain training: |global| (for max_update_norm_ratio, measured once) and the sum of
    # weight x largest |value| over the accepted updates (what the FedAvg sum can reach).
    global_norm: float | None = None
    weighted_magnitude: float = 0.0

    def done(self) -> bool:
        # finished only ever holds participants: comparing sizes is enough, and O(1) on each
        # of a large round's thousands of results.
        return len(self.finished) >= len(self.participants)


@dataclass
class Training:
    """What a round's training produced: the new global model, or None when the attempt fell
    short (fewer than min_results updates, or secure aggregation below its threshold)."""

    state: StateDict | None
    accepted: int
    answered: frozenset[str]  # participants that kept answering to the end
    rejected: dict[str, str]
    metrics: list[tuple[int, Mapping[str, float]]]


@dataclass
class RoundRecord:
    """One row of metrics.jsonl."""

    round: int
    clients_sampled: int
    clients_accepted: int
    rejected: dict[str, str]
    train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    federated_loss: float | None
    federated_accuracy: float | None
    seconds: float
    bytes_down: int
    bytes_up: int
    epsilon: float | None = None  # DP: privacy spent after this round, at dp_delta
    # Record-level DP-SGD: the largest epsilon this round's clients reported (plaintext rounds
    # only: under secure aggregation clients send no metrics, and log it instead).
    dpsgd_epsilon: float | None = None
    # The task's other evaluation metrics by name (MSE, AUROC...; server/metrics.py).
    test_metrics: dict[str, float] = field(default_factory=dict)
    federated_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSummary:
    rounds_completed: int  # the last completed round, counting rounds done before a resume
    completed: bool
    stopped_by_signal: bool
    final_model: Path  # the last global model, a safetensors file in the state directory
    # The last round this process ran. Only the last: the rows of a long run are in
    # metrics.jsonl (via `on_round`), never accumulated in the coordinator's memory.
    last_record: RoundRecord | None
    budget_spent: bool = False  # DP: stopped before a round that would exceed dp_max_epsilon
    # The coordinator could not write its state (disk full, I/O error): it stopped after the
    # last good checkpoint without telling clients the run finished, so a restart resumes.
    storage_failure: str | None = None
