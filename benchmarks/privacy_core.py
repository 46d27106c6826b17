"""Privacy primitives benchmark: mask expansion speed and secure aggregation's cost per client.

    .venv/bin/python benchmarks/privacy_core.py                  # n = 5, 10, 20; both rings
    .venv/bin/python benchmarks/privacy_core.py --clients 10 --ring-bits 64
    .venv/bin/python benchmarks/privacy_core.py --clients 100 --ring-bits 64 --neighbours 0 14

It measures the protocol-independent core (fedlink.common.prg/shamir/fixedpoint/secagg), in one
process, on the FedAvg CNN of the MNIST task (1,663,370 float32 parameters):

1. mask expansion: ChaCha20 keystream written straight into a uint64 vector the size of the
   model (GB/s of mask produced), and `add_keystream`, expansion fused with the modular add into
   the vector, which is what masking and unmasking do per peer; a numpy copy of the same vector
   gives the machine's memory bandwidth for comparison;
2. for each number of clients n (threshold n // 2 + 1) and ring width: a whole session with
   every client in this process, timing each step: a client's key sharing, encoding and masking
   (n - 1 pairwise masks and a self mask), and the coordinator's unmasking, without dropouts and
   with 20% of the clients dropped after sharing keys (the coordinator then re-derives their
   pairwise masks with every survivor); `--neighbours` adds SecAgg+ sessions with k neighbours
   per client (0: the complete graph, the default);
3. Shamir sharing at larger cohorts (n = 20, 100, 300 by default, threshold n // 2 + 1): one
   client splitting a secret among n holders, and the coordinator rebuilding n secrets (one per
   survivor) from every survivor's share, consistency check included;
4. bytes per client: every message of the session crosses as the bytes it has on the wire
   (fedlink.common.secagg_wire: the step messages serialized, the masked vector as raw ring
   elements, the session setup each of the four task headers carries); the gRPC and chunk framing
   around them is not counted. Counted for one client that survives, against the plaintext
   update: the model's state_dict as safetensors, as a client sends it today.

It checks that every session's decoded average matches plaintext FedAvg within the documented
quantization bound. Prints a table and writes JSON (default benchmarks/results/privacy_core.json).
Timings are wall-clock seconds on this machine; on a shared machine they are upper bounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlink.common import prg
from fedlink.common import secagg_wire as wire
from fedlink.common.fixedpoint import (
    FixedPoint,
    UpdateLayout,
    decode_weighted_average,
    encode_weighted_update,
)
from fedlink.common.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SessionGraph,
    majority_of,
)
from fedlink.common.shamir import reconstruct_secret, split_secret
from fedlink.common.tasks.mnist import build_model
from fedlink.common.tensors import encode_state, manifest_of
from fedlink.server.aggregation import StreamingFedAvg

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "privacy_core.json"
DEFAULT_CLIENTS = (5, 10, 20)
DEFAULT_SHAMIR_CLIENTS = (20, 100, 300)
MAX_WEIGHT = 1000.0
VALUE_BOUND = 4.0  # the CNN's weights plus perturbation stay far below this
DROPOUT_SHARE = 0.2
GB = 1e9


def best_of(repeats: int, action: Callable[[], object]) -> tuple[float, float]:
    """(best, median) wall seconds of `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def expansion(length: int, repeats: int) -> dict[str, float]:
    key = bytes(range(32))
    out = np.empty(length, dtype=np.uint64)
    acc = np.zeros(length, dtype=np.uint64)
    prg.keystream_into(key, out)  # fault the pages in once

    best, median = best_of(repeats, lambda: prg.keystream_into(key, out))
    best_add, median_add = best_of(repeats, lambda: prg.add_keystream(key, acc))
    best_copy, _ = best_of(repeats, lambda: np.copyto(acc, out))
    return {
        "bytes": out.nbytes,
        "expand_gbps_best": out.nbytes / best / GB,
        "expand_gbps_median": out.nbytes / median / GB,
        "expand_add_gbps_best": out.nbytes / best_add / GB,
        "expand_add_gbps_median": out.nbytes / median_add / GB,
        "memcpy_gbps_best": out.nbytes / best_copy / GB,
    }


def client_states(n: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    torch.manual_seed(0)
    base = build_model().state_dict()
    generator = torch.Generator().manual_seed(1)
    states = [
        {name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in base.items()}
        for _ in range(n)
    ]
    weights = [float(w) for w in torch.randint(100, int(MAX_WEIGHT), (n,), generator=generator)]
    return states, weights


def session(n: int, ring_bits: int, dropped: int, neighbours: int = 0) -> dict[str, Any]:
    states, weights = client_states(n)
    manifest = manifest_of(states[0])
    layout = UpdateLayout(manifest)
    encoding = FixedPoint.for_sum(num_clients=n, value_bound=VALUE_BOUND, ring_bits=ring_bits)
    threshold = n // 2 + 1
    params = SecAggParams(
        "bench/round-1",
        threshold,
        layout.length,
        ring_bits,
        neighbours=neighbours,
        neighbour_threshold=majority_of(neighbours) if neighbours else 0,
    )
    setup = wire.SessionSetup(params, encoding, MAX_WEIGHT)
    ids = [f"site-{i:02d}" for i in range(n)]
    clients = {i: SecAggClient(i, params) for i in ids}
    server = SecAggServer(params)
    timings: dict[str, list[float]] = {
        "share_keys": [],
        "encode": [],
        "mask": [],
        "unmask_response": [],
    }

    sent: dict[str, int] = {}
    received: dict[str, int] = {
        "setup_in_4_task_headers": 4 * wire.setup_to_proto(setup).ByteSize()
    }
    for identity in ids:
        keys = wire.keys_to_bytes(clients[identity].advertise())
        sent["keys"] = len(keys)
        server.add_keys(identity, wire.keys_from_bytes(keys))
    roster_bytes = wire.roster_to_bytes(server.close_advertisement())
    received["roster"] = len(roster_bytes)
    # Dropped clients spread over the ring (every fifth place), so no neighbourhood loses more
    # than t_k of its holders; with the complete graph any choice is the same.
    ring = SessionGraph.of(params, wire.roster_from_bytes(roster_bytes)).ring
    gone = set(ring[:: max(1, n // dropped)][:dropped]) if dropped else set()
    probe = next(i for i in reversed(ids) if i not in gone)  # the client whose bytes count
    for identity in ids:
        roster = wire.roster_from_bytes(roster_bytes)
        start = time.perf_counter()
        outbox = clients[identity].share_keys(roster)
        timings["share_keys"].append(time.perf_counter() - start)
        outbox_bytes = wire.shares_to_bytes(outbox)
        if identity == probe:
            sent["share_bundles"] = len(outbox_bytes)
        server.add_shares(identity, wire.shares_from_bytes(outbox_bytes))
    server.close_sharing()
    folding = 0.0
    for k, identity in enumerate(ids):
        if identity in gone:
            continue
        start = time.perf_counter()
        vector = encode_weighted_update(
            states[k], weights[k], max_weight=MAX_WEIGHT, layout=layout, encoding=encoding
        )
        timings["encode"].append(time.perf_counter() - start)
        inbox_bytes = wire.shares_to_bytes(server.shares_for(identity), server.contributors)
        inbox, announced = wire.inbox_from_bytes(inbox_bytes)
        start = time.perf_counter()
        masked = clients[identity].masked_input(vector, inbox, announced).tobytes()
        timings["mask"].append(time.perf_counter() - start)
        start = time.perf_counter()
        server.add_masked_input(identity, params.vector_from_bytes(masked))
        folding += time.perf_counter() - start
        if identity == probe:
            received["share_bundles"] = len(inbox_bytes)
            sent["masked_vector"] = len(masked)
    # The consistency step without certificates (the statement's digest stands in for the
    # signature, as in --insecure mode): a signature's cost is in the federation benchmark.
    survivors = wire.unmask_request_from_bytes(
        wire.unmask_request_to_bytes(server.close_masked_inputs())
    )
    for identity in survivors.survivors:
        statement = clients[identity].agree(survivors, b"setup")
        server.add_view_signature(identity, hashlib.sha256(statement).digest())
    request_bytes = wire.unmask_request_to_bytes(server.close_agreement())
    received["unmask_request"] = len(request_bytes)
    request = wire.unmask_request_from_bytes(request_bytes)
    for identity in request.survivors:
        start = time.perf_counter()
        response = wire.unmask_response_to_bytes(clients[identity].unmask(request))
        timings["unmask_response"].append(time.perf_counter() - start)
        if identity == probe:
            sent["unmask_shares"] = len(response)
        server.add_unmask_response(identity, wire.unmask_response_from_bytes(response))
    start = time.perf_counter()
    total = server.result()
    unmask_seconds = time.perf_counter() - start
    start = time.perf_counter()
    secure = decode_weighted_average(total, layout=layout, encoding=encoding)
    decode_seconds = time.perf_counter() - start

    included = [k for k, identity in enumerate(ids) if identity not in gone]
    plain = StreamingFedAvg(manifest, states[0])
    plain_start = time.perf_counter()
    for k in included:
        plain.add(states[k], weights[k])
    plain_fold_seconds = time.perf_counter() - plain_start
    reference = plain.result()
    total_weight = sum(weights[k] for k in included)
    decoded = encoding.decode(total)
    exact = torch.cat(
        [
            (sum(states[k][name].double() * weights[k] for k in included) / total_weight).reshape(
                -1
            )  # type: ignore[union-attr]
            for name, _ in layout.entries
        ]
    ).numpy()
    error = float(np.abs(decoded[:-1] / decoded[-1] - exact).max())
    bound = encoding.average_error_bound(len(included), total_weight / MAX_WEIGHT)
    if error > bound:
        raise SystemExit(f"secure average off by {error} > bound {bound} (n={n}, ring={ring_bits})")
    float32_gap = max(
        float((secure[name] - reference[name]).abs().max()) for name, _ in layout.entries
    )

    plaintext_bytes = len(encode_state(states[0]))
    vector_bytes = sent["masked_vector"]
    upload, download = sent, received
    up = sum(upload.values())
    return {
        "clients": n,
        "threshold": threshold,
        "neighbours": neighbours,
        "ring_bits": ring_bits,
        "dropped_after_sharing": dropped,
        "frac_bits": encoding.frac_bits,
        "average_error": error,
        "average_error_bound": bound,
        "float32_gap_to_plaintext_fedavg": float32_gap,
        "seconds": {
            "client_share_keys": statistics.median(timings["share_keys"]),
            "client_encode": statistics.median(timings["encode"]),
            "client_mask": statistics.median(timings["mask"]),
            "client_unmask_response": statistics.median(timings["unmask_response"]),
            "server_fold_all_masked": folding,
            "server_unmask": unmask_seconds,
            "server_decode": decode_seconds,
            "plaintext_server_fold_all": plain_fold_seconds,
        },
        "bytes_per_client": {
            "plaintext_update": plaintext_bytes,
            "upload": upload,
            "download_extra": download,
            "upload_total": up,
            "upload_ratio": up / plaintext_bytes,
            "protocol_overhead_beyond_vector": up - vector_bytes + sum(download.values()),
        },
    }


def sharing(n: int) -> dict[str, float]:
    """Seconds for one client to split a 32-byte secret among n holders, and for the
    coordinator to rebuild n secrets from all n holders' shares (threshold n // 2 + 1)."""
    threshold = n // 2 + 1
    holders = list(range(1, n + 1))
    split_seconds, _ = best_of(3, lambda: split_secret(bytes(32), threshold, holders))
    sharings = [split_secret(bytes([k % 256]) * 32, threshold, holders) for k in range(n)]
    started = time.perf_counter()
    for shares in sharings:
        reconstruct_secret(shares, threshold)
    return {
        "clients": n,
        "threshold": threshold,
        "split_one_seconds": split_seconds,
        "rebuild_all_seconds": time.perf_counter() - started,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=list(DEFAULT_CLIENTS))
    parser.add_argument("--ring-bits", type=int, nargs="+", default=[64, 32])
    parser.add_argument(
        "--shamir-clients", type=int, nargs="+", default=list(DEFAULT_SHAMIR_CLIENTS)
    )
    parser.add_argument(
        "--neighbours",
        type=int,
        nargs="+",
        default=[0],
        help="SecAgg+ neighbours per client (even; 0 = complete graph)",
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="repetitions of the expansion timing"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    length = UpdateLayout(manifest_of(build_model().state_dict())).length
    speed = expansion(length, args.repeats)
    print(
        f"mask expansion, {speed['bytes'] / 1e6:.1f} MB uint64 vector (the CNN plus weight slot):"
    )
    print(
        f"  ChaCha20 keystream          {speed['expand_gbps_best']:6.2f} GB/s best, {speed['expand_gbps_median']:6.2f} median"
    )
    print(
        f"  keystream + modular add     {speed['expand_add_gbps_best']:6.2f} GB/s best, {speed['expand_add_gbps_median']:6.2f} median"
    )
    print(f"  (numpy copy of the same)    {speed['memcpy_gbps_best']:6.2f} GB/s best")

    rows = []
    for ring_bits in args.ring_bits:
        for n in args.clients:
            for k in args.neighbours:
                for dropped in (0, max(1, round(DROPOUT_SHARE * n))):
                    rows.append(session(n, ring_bits, dropped, k))

    header = (
        f"{'n':>3} {'t':>3} {'k':>3} {'ring':>4} {'drop':>4} | {'share s':>7} {'encode s':>8} {'mask s':>7} | "
        f"{'srv unmask s':>12} {'plain fold s':>12} | {'plain MB':>8} {'up MB':>7} {'ratio':>5} {'extra KB':>8} | {'avg err':>8} {'bound':>8}"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        s, b = row["seconds"], row["bytes_per_client"]
        print(
            f"{row['clients']:>3} {row['threshold']:>3} {row['neighbours']:>3} {row['ring_bits']:>4} {row['dropped_after_sharing']:>4} | "
            f"{s['client_share_keys']:>7.3f} {s['client_encode']:>8.3f} {s['client_mask']:>7.3f} | "
            f"{s['server_unmask']:>12.3f} {s['plaintext_server_fold_all']:>12.3f} | "
            f"{b['plaintext_update'] / 1e6:>8.2f} {b['upload_total'] / 1e6:>7.2f} {b['upload_ratio']:>5.2f} "
            f"{b['protocol_overhead_beyond_vector'] / 1e3:>8.1f} | {row['average_error']:>8.1e} {row['average_error_bound']:>8.1e}"
        )

    shamir = [sharing(n) for n in args.shamir_clients]
    print(f"\n{'n':>4} {'t':>4} | {'split one ms':>12} {'rebuild n s':>11}")
    for row in shamir:
        print(
            f"{row['clients']:>4} {row['threshold']:>4} | {row['split_one_seconds'] * 1e3:>12.2f} "
            f"{row['rebuild_all_seconds']:>11.3f}"
        )

    document = {
        "benchmark": "privacy_core",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "model": {"name": "mnist FedAvgCNN", "parameters": length - 1},
        "expansion": speed,
        "sessions": rows,
        "shamir": shamir,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
