"""Secure aggregation end to end, in process: n clients and a coordinator exchanging the real
messages (keys, encrypted shares, masked vectors, unmasking shares), with dropouts at every step."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from fedlink.common.dp import (
    add_gaussian_noise,
    client_noise_std,
    clip_update,
    secure_value_bound,
    sum_noise_std,
)
from fedlink.common.errors import SecAggError, SecAggRefused
from fedlink.common.fixedpoint import (
    FixedPoint,
    UpdateLayout,
    decode_weighted_average,
    encode_weighted_update,
)
from fedlink.common.secagg import (
    KeyAdvertisement,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SessionGraph,
    ShareGuard,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlink.common.shamir import Share
from fedlink.common.tensors import StateDict, manifest_of
from fedlink.server.aggregation import StreamingFedAvg

MAX_WEIGHT = 1000.0
VALUE_BOUND = 8.0


def _states(n: int, seed: int = 0) -> tuple[list[StateDict], list[float]]:
    generator = torch.Generator().manual_seed(seed)
    states = [
        {
            "conv.weight": torch.randn(8, 3, 3, 3, generator=generator),
            "conv.bias": torch.randn(8, generator=generator),
            "fc.weight": torch.randn(10, 72, generator=generator, dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(7),
        }
        for _ in range(n)
    ]
    weights = [float(w) for w in torch.randint(1, int(MAX_WEIGHT), (n,), generator=generator)]
    return states, weights


@dataclass
class Session:
    ids: list[str]
    clients: dict[str, SecAggClient]
    server: SecAggServer
    vectors: dict[str, np.ndarray]
    masked: dict[str, np.ndarray]
    sent_shares: dict[str, dict[str, bytes]] = field(default_factory=dict)
    received_shares: dict[str, dict[str, bytes]] = field(default_factory=dict)
    responses: dict[str, UnmaskResponse] = field(default_factory=dict)


def _run(
    states: list[StateDict],
    weights: list[float],
    threshold: int,
    *,
    drop_after_keys: Collection[int] = (),
    drop_after_shares: Collection[int] = (),
    drop_after_masked: Collection[int] = (),
    ring_bits: int = 64,
) -> tuple[Session, np.ndarray, UpdateLayout, FixedPoint]:
    session, roster = _advertised(len(states), threshold, ring_bits=ring_bits)
    return _finish(
        session,
        roster,
        states,
        weights,
        drop_after_keys=drop_after_keys,
        drop_after_shares=drop_after_shares,
        drop_after_masked=drop_after_masked,
    )


def _advertised(
    n: int,
    threshold: int,
    *,
    ring_bits: int = 64,
    neighbours: int = 0,
    neighbour_threshold: int = 0,
    vector_length: int | None = None,
) -> tuple[Session, dict[str, KeyAdvertisement]]:
    """A session of n clients through key advertisement: the roster U1 every client receives."""
    params = SecAggParams(
        session="federation-a/round-3/task-9",
        threshold=threshold,
        vector_length=vector_length or UpdateLayout(manifest_of(_states(1)[0][0])).length,
        ring_bits=ring_bits,
        neighbours=neighbours,
        neighbour_threshold=neighbour_threshold,
    )
    ids = [f"site-{i:02d}" for i in range(n)]
    session = Session(ids, {i: SecAggClient(i, params) for i in ids}, SecAggServer(params), {}, {})
    for identity in ids:
        session.server.add_keys(identity, session.clients[identity].advertise())
    return session, session.server.close_advertisement()


def _finish(
    session: Session,
    roster: dict[str, KeyAdvertisement],
    states: list[StateDict],
    weights: list[float],
    *,
    drop_after_keys: Collection[int] = (),
    drop_after_shares: Collection[int] = (),
    drop_after_masked: Collection[int] = (),
) -> tuple[Session, np.ndarray, UpdateLayout, FixedPoint]:
    """The rest of the session: client k of `session.ids` leaves at the step its set names."""
    ids, server = session.ids, session.server
    layout = UpdateLayout(manifest_of(states[0]))
    encoding = FixedPoint.for_sum(
        num_clients=len(ids), value_bound=VALUE_BOUND, ring_bits=server.params.ring_bits
    )
    for k, identity in enumerate(ids):
        if k not in drop_after_keys:
            session.sent_shares[identity] = session.clients[identity].share_keys(roster)
            server.add_shares(identity, session.sent_shares[identity])
    server.close_sharing()
    for k, identity in enumerate(ids):
        if k in drop_after_keys or k in drop_after_shares:
            continue
        vector = encode_weighted_update(
            states[k], weights[k], max_weight=MAX_WEIGHT, layout=layout, encoding=encoding
        )
        session.vectors[identity] = vector
        session.received_shares[identity] = server.shares_for(identity)
        session.masked[identity] = session.clients[identity].masked_input(
            vector, session.received_shares[identity], server.contributors
        )
        server.add_masked_input(identity, session.masked[identity])
    request = _agreed(server, session.clients)
    for k, identity in enumerate(ids):
        if identity in request.survivors and k not in drop_after_masked:
            session.responses[identity] = session.clients[identity].unmask(request)
            server.add_unmask_response(identity, session.responses[identity])
    return session, server.result(), layout, encoding


def _agreed(server: SecAggServer, clients: Mapping[str, SecAggClient]) -> UnmaskRequest:
    """Steps 3's end and 4: every survivor agrees to the survivor set (no certificates at this
    level, so each one's statement stands in for its signature; client/secure.py signs)."""
    return _agree_to(server.close_masked_inputs(), server, clients)


def _agree_to(
    request: UnmaskRequest, server: SecAggServer, clients: Mapping[str, SecAggClient]
) -> UnmaskRequest:
    """Step 4 for the survivor set step 3 ended with (see `_agreed`)."""
    for identity in request.survivors:
        server.add_view_signature(identity, clients[identity].agree(request, b"setup"))
    return server.close_agreement()


def _check_matches_fedavg(
    total: np.ndarray,
    layout: UpdateLayout,
    encoding: FixedPoint,
    states: list[StateDict],
    weights: list[float],
    included: list[int],
) -> None:
    """The decoded average equals exact weighted FedAvg over `included` within the documented
    bound, and the model tensors equal the plaintext aggregator's to float32 rounding."""
    total_weight = sum(weights[k] for k in included)
    bound = encoding.average_error_bound(len(included), total_weight / MAX_WEIGHT)
    decoded = encoding.decode(total)
    decoded_average = decoded[:-1] / decoded[-1]
    exact = torch.cat(
        [
            sum(states[k][name].double() * weights[k] for k in included).reshape(-1) / total_weight
            for name, _ in layout.entries
        ]  # type: ignore[union-attr]
    ).numpy()
    assert np.abs(decoded_average - exact).max() <= bound
    assert bound < 1e-9  # the 64-bit ring is far finer than float32

    secure = decode_weighted_average(total, layout=layout, encoding=encoding)
    plain = StreamingFedAvg(manifest_of(states[0]), states[0])
    for k in included:
        plain.add(states[k], weights[k])
    reference = plain.result()
    for name, spec in layout.entries:
        assert secure[name].dtype == spec.dtype
        assert torch.allclose(secure[name], reference[name], rtol=0, atol=1e-6), name
    assert "bn.num_batches_tracked" not in secure  # counters are not part of the secure sum


@pytest.mark.parametrize("n", [5, 10, 20])
def test_sum_of_masked_inputs_equals_plaintext_fedavg_without_dropouts(n: int) -> None:
    states, weights = _states(n, seed=n)
    session, total, layout, encoding = _run(states, weights, threshold=n // 2 + 1)
    _check_matches_fedavg(total, layout, encoding, states, weights, list(range(n)))
    # Every masked vector differs from the encoded update it hides.
    for identity, vector in session.vectors.items():
        assert np.mean(session.masked[identity] == vector) < 0.01


def test_sum_is_recovered_when_clients_drop_at_every_step_down_to_the_threshold() -> None:
    n, threshold = 12, 7
    states, weights = _states(n, seed=1)
    # 2 drop after advertising keys, 3 after sharing theirs (their pairwise masks are in the
    # others' inputs), leaving exactly 7 masked inputs; then no survivor drops.
    _, total, layout, encoding = _run(
        states, weights, threshold, drop_after_keys={0, 5}, drop_after_shares={1, 6, 11}
    )
    _check_matches_fedavg(total, layout, encoding, states, weights, [2, 3, 4, 7, 8, 9, 10])


def test_sum_is_recovered_when_survivors_drop_after_sending_masked_input() -> None:
    n, threshold = 10, 6
    states, weights = _states(n, seed=2)
    # All ten masked inputs count; four senders vanish before unmasking, six shares remain.
    _, total, layout, encoding = _run(
        states, weights, threshold, drop_after_shares={3}, drop_after_masked={0, 4, 8}
    )
    _check_matches_fedavg(total, layout, encoding, states, weights, [0, 1, 2, 4, 5, 6, 7, 8, 9])


def test_dropouts_in_every_step_with_a_32_bit_ring() -> None:
    states, weights = _states(9, seed=3)
    _, total, layout, encoding = _run(
        states,
        weights,
        5,
        drop_after_keys={8},
        drop_after_shares={2},
        drop_after_masked={0, 1},
        ring_bits=32,
    )
    included = [0, 1, 3, 4, 5, 6, 7]
    bound = encoding.average_error_bound(
        len(included), sum(weights[k] for k in included) / MAX_WEIGHT
    )
    secure = decode_weighted_average(total, layout=layout, encoding=encoding)
    total_weight = sum(weights[k] for k in included)
    for name, _ in layout.entries:
        exact = sum(states[k][name].double() * weights[k] for k in included) / total_weight
        assert isinstance(exact, torch.Tensor)
        # Plus float32 rounding of the result (values are below 8).
        assert (secure[name].double() - exact).abs().max() <= bound + 8 * 2.0**-24, name


def test_round_fails_cleanly_when_fewer_than_threshold_masked_inputs_arrive() -> None:
    states, weights = _states(8, seed=4)
    with pytest.raises(
        SecAggError, match=r"only 4 clients sent masked inputs; secure aggregation needs at least 5"
    ):
        _run(states, weights, 5, drop_after_keys={0, 1}, drop_after_shares={2, 3})


def test_round_fails_cleanly_when_fewer_than_threshold_survivors_answer() -> None:
    states, weights = _states(8, seed=5)
    with pytest.raises(SecAggError, match=r"only 4 clients answered the unmasking request"):
        _run(states, weights, 5, drop_after_masked={0, 1, 2, 3})


def test_round_fails_cleanly_when_too_few_clients_advertise_or_share() -> None:
    params = SecAggParams(session="s", threshold=3, vector_length=4)
    server = SecAggServer(params)
    for identity in ("a", "b"):
        server.add_keys(identity, SecAggClient(identity, params).advertise())
    with pytest.raises(SecAggError, match="only 2 clients advertised keys"):
        server.close_advertisement()
    with pytest.raises(SecAggError, match="out of order"):  # the session is over
        server.add_keys("c", SecAggClient("c", params).advertise())


def _through_masking(
    n: int = 5, threshold: int = 3, drop_after_shares: Collection[int] = ()
) -> tuple[list[str], dict[str, SecAggClient], SecAggServer]:
    params = SecAggParams(session="s", threshold=threshold, vector_length=16)
    ids = [f"c{i}" for i in range(n)]
    clients = {i: SecAggClient(i, params) for i in ids}
    server = SecAggServer(params)
    for identity in ids:
        server.add_keys(identity, clients[identity].advertise())
    roster = server.close_advertisement()
    for identity in ids:
        server.add_shares(identity, clients[identity].share_keys(roster))
    server.close_sharing()
    for k, identity in enumerate(ids):
        if k not in drop_after_shares:
            server.add_masked_input(
                identity,
                clients[identity].masked_input(
                    np.arange(16, dtype=np.uint64),
                    server.shares_for(identity),
                    server.contributors,
                ),
            )
    return ids, clients, server


def test_client_refuses_to_agree_to_a_peer_both_surviving_and_dropped() -> None:
    ids, clients, _ = _through_masking()
    greedy = UnmaskRequest(survivors=tuple(ids), dropped=("c1",))
    with pytest.raises(SecAggRefused, match="both survived and dropped"):
        clients["c0"].agree(greedy, b"setup")


def test_client_unmasks_only_the_survivor_set_it_agreed_to() -> None:
    ids, clients, server = _through_masking()
    honest = _agreed(server, clients)
    first = clients["c0"].unmask(honest)
    assert set(first.self_mask_shares) == set(ids) and not first.mask_key_shares
    # The coordinator now claims c1 dropped, to get c1's mask-key share as well.
    lying = UnmaskRequest(survivors=tuple(i for i in ids if i != "c1"), dropped=("c1",))
    with pytest.raises(SecAggRefused, match="differs from the survivor set this client signed"):
        clients["c0"].unmask(lying)
    with pytest.raises(SecAggError, match="out of order"):  # one survivor set per session
        clients["c0"].agree(lying, b"setup")
    # Refusal releases nothing and the honest request can still be answered identically.
    assert clients["c0"].unmask(honest) == first


def test_the_share_guard_refuses_the_other_kind_in_a_later_release() -> None:
    guard = ShareGuard()
    guard.release({"c1": ShareKind.SELF_MASK})
    with pytest.raises(
        SecAggRefused,
        match=r"refusing to reveal the mask key share of 'c1'.*self-mask seed share was already revealed",
    ):
        guard.release({"c1": ShareKind.MASK_KEY, "c2": ShareKind.SELF_MASK})
    guard.release({"c1": ShareKind.SELF_MASK, "c2": ShareKind.MASK_KEY})  # nothing was recorded


def test_client_refuses_to_be_counted_as_dropped_and_to_unmask_below_threshold() -> None:
    _, clients, _ = _through_masking()
    with pytest.raises(SecAggRefused, match="cannot count it as dropped"):
        clients["c0"].agree(UnmaskRequest(survivors=("c1", "c2", "c3"), dropped=("c0",)), b"")
    with pytest.raises(SecAggError, match="only 2 clients survived"):
        clients["c0"].agree(UnmaskRequest(survivors=("c0", "c1"), dropped=("c2", "c3", "c4")), b"")


def test_client_refuses_a_threshold_of_half_the_roster_or_less() -> None:
    params = SecAggParams(session="s", threshold=3, vector_length=4)
    clients = {i: SecAggClient(i, params) for i in ("a", "b", "c", "d", "e", "f")}
    roster = {i: c.advertise() for i, c in clients.items()}
    with pytest.raises(SecAggRefused, match="must be at least 4"):
        clients["a"].share_keys(roster)


def test_client_refuses_a_roster_that_replaces_its_keys_or_repeats_one() -> None:
    params = SecAggParams(session="s", threshold=2, vector_length=4)
    a, b, c = (SecAggClient(i, params) for i in "abc")
    ads = {"a": a.advertise(), "b": b.advertise(), "c": c.advertise()}
    with pytest.raises(SecAggError, match="own keys"):
        a.share_keys({**ads, "a": ads["b"]})
    with pytest.raises(SecAggError, match="repeats a public key"):
        b.share_keys({**ads, "c": replace(ads["c"], mask_key=ads["a"].mask_key)})


def test_tampered_or_misrouted_share_bundles_fail_authentication() -> None:
    params = SecAggParams(session="s", threshold=2, vector_length=4)
    clients = {i: SecAggClient(i, params) for i in "abc"}
    roster = {i: c.advertise() for i, c in clients.items()}
    outboxes = {i: c.share_keys(roster) for i, c in clients.items()}
    vector = np.zeros(4, dtype=np.uint64)
    tampered = bytearray(outboxes["b"]["a"])
    tampered[5] ^= 1
    everyone = ("a", "b", "c")
    with pytest.raises(SecAggError, match="from 'b' failed authentication"):
        clients["a"].masked_input(vector, {"b": bytes(tampered), "c": outboxes["c"]["a"]}, everyone)
    with pytest.raises(SecAggRefused, match=r"relayed them from \['a', 'mallory'\]"):
        clients["a"].masked_input(
            vector, {"a": outboxes["b"]["a"], "mallory": outboxes["c"]["a"]}, everyone
        )
    # c's bundle for b, relayed to a as if it came from c, does not decrypt either.
    with pytest.raises(SecAggError, match="from 'c' failed authentication"):
        clients["a"].masked_input(
            vector, {"b": outboxes["b"]["a"], "c": outboxes["c"]["b"]}, everyone
        )


def test_share_bundles_relayed_by_the_coordinator_do_not_contain_the_shares_in_clear() -> None:
    params = SecAggParams(session="s", threshold=2, vector_length=4)
    clients = {i: SecAggClient(i, params) for i in "xyz"}
    roster = {i: c.advertise() for i, c in clients.items()}
    outboxes = {i: c.share_keys(roster) for i, c in clients.items()}
    clients["y"].masked_input(
        np.zeros(4, dtype=np.uint64),
        {"x": outboxes["x"]["y"], "z": outboxes["z"]["y"]},
        ("x", "y", "z"),
    )
    request = UnmaskRequest(survivors=("x", "y", "z"), dropped=())
    clients["y"].agree(request, b"setup")
    revealed = clients["y"].unmask(request)
    share_value = revealed.self_mask_shares["x"].to_bytes()[2:]
    assert share_value not in outboxes["x"]["y"]


def test_server_detects_a_corrupted_unmasking_share() -> None:
    _, clients, server = _through_masking(drop_after_shares={4})
    request = _agreed(server, clients)
    for identity in request.survivors:
        response = clients[identity].unmask(request)
        if identity == "c0":
            share = response.mask_key_shares["c4"]
            response = UnmaskResponse(
                response.self_mask_shares, {"c4": Share(share.x, (share.y + 1) % (1 << 521))}
            )
        server.add_unmask_response(identity, response)
    with pytest.raises(SecAggError, match=r"inconsistent|corrupted|does not match"):
        server.result()


def test_one_survivor_with_corrupted_shares_is_found_and_left_out_given_two_spare_answers() -> None:
    # 6 survivors, threshold 4: without c2 there are still 5 answers, one more than needed to
    # check every rebuilt secret, so c2's wrong share is pinned on c2 and the sum is right.
    _, clients, server = _through_masking(n=6, threshold=4)
    request = _agreed(server, clients)
    for identity in request.survivors:
        response = clients[identity].unmask(request)
        if identity == "c2":
            share = response.self_mask_shares["c1"]
            shares = dict(response.self_mask_shares)
            shares["c1"] = Share(share.x, (share.y + 1) % (1 << 521))
            response = UnmaskResponse(shares, response.mask_key_shares)
        server.add_unmask_response(identity, response)
    assert server.corrupt_responders == []
    total = server.result()
    assert server.corrupt_responders == ["c2"]
    assert np.array_equal(total, 6 * np.arange(16, dtype=np.uint64))


def test_server_refuses_inputs_from_outside_the_session_and_duplicates() -> None:
    _, _, server = _through_masking(drop_after_shares={4})
    with pytest.raises(SecAggError, match="already sent its masked input"):
        server.add_masked_input("c0", np.zeros(16, dtype=np.uint64))
    with pytest.raises(SecAggError, match="not among the clients that shared keys"):
        server.add_masked_input("mallory", np.zeros(16, dtype=np.uint64))
    with pytest.raises(SecAggError, match="expected a ring vector of 16"):
        server.add_masked_input("c4", np.zeros(15, dtype=np.uint64))


@pytest.mark.parametrize(("n", "k", "t_k"), [(5, 0, 0), (9, 4, 3)], ids=["complete", "secagg+"])
def test_a_masked_vector_is_independent_of_the_update_it_hides(n: int, k: int, t_k: int) -> None:
    """What the coordinator receives from one client looks uniformly random: its bytes are
    uniform and its values uncorrelated with the encoded update, even for a structured update
    (with SecAgg+, a client masked by only its k neighbours)."""
    length = 1 << 16
    params = SecAggParams(
        session="s",
        threshold=n // 2 + 1,
        vector_length=length,
        neighbours=k,
        neighbour_threshold=t_k,
    )
    ids = [f"c{i}" for i in range(n)]
    clients = {i: SecAggClient(i, params) for i in ids}
    server = SecAggServer(params)
    for identity in ids:
        server.add_keys(identity, clients[identity].advertise())
    roster = server.close_advertisement()
    for identity in ids:
        server.add_shares(identity, clients[identity].share_keys(roster))
    server.close_sharing()
    encoding = FixedPoint.for_sum(num_clients=n, value_bound=1.0)
    ramp = np.linspace(-1.0, 1.0, length)
    vectors = {i: encoding.encode(ramp * (j + 1) / n) for j, i in enumerate(ids)}
    masked = {}
    for identity in ids:
        masked[identity] = clients[identity].masked_input(
            vectors[identity], server.shares_for(identity), server.contributors
        )
        server.add_masked_input(identity, masked[identity])

    assert len(server.shares_for("c0")) == (k or n - 1)  # the peers whose masks hide c0's
    one = masked["c0"]
    counts = np.bincount(one.view(np.uint8), minlength=256)
    expected = one.nbytes / 256
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 400  # 255 degrees of freedom: mean 255, sd 22.6
    correlation = np.corrcoef(one.astype(np.float64), encoding.decode(vectors["c0"]))[0, 1]
    assert abs(correlation) < 5 / np.sqrt(length)

    request = _agreed(server, clients)
    for identity in ids:
        server.add_unmask_response(identity, clients[identity].unmask(request))
    expected_sum = sum(ramp * (j + 1) / n for j in range(n))
    assert np.abs(
        encoding.decode(server.result()) - expected_sum
    ).max() <= encoding.sum_error_bound(n)


def test_split_dp_noise_through_secure_aggregation_gives_the_sum_its_full_noise() -> None:
    """DP-FedAvg with secure aggregation: clients clip, add N(0, sigma^2 / t) each and mask; with
    m >= t survivors the unmasked sum is the clipped sum plus noise of variance m / t * sigma^2,
    so never less than the accounted sigma^2, and nobody saw a less noisy sum."""
    n, threshold, dimension = 10, 6, 20_000
    z, clip = 1.0, 0.5
    generator = torch.Generator().manual_seed(7)
    updates = [
        {"w": torch.randn(dimension, generator=generator, dtype=torch.float64)} for _ in range(n)
    ]
    client_std = client_noise_std(z, clip, threshold)
    bound = secure_value_bound(clip, client_std, dimension)
    encoding = FixedPoint.for_sum(num_clients=n, value_bound=bound)
    layout = UpdateLayout(manifest_of(updates[0]))
    params = SecAggParams(session="dp", threshold=threshold, vector_length=layout.length)
    ids = [f"c{i}" for i in range(n)]
    clients = {i: SecAggClient(i, params) for i in ids}
    server = SecAggServer(params)
    for identity in ids:
        server.add_keys(identity, clients[identity].advertise())
    roster = server.close_advertisement()
    for identity in ids:
        server.add_shares(identity, clients[identity].share_keys(roster))
    server.close_sharing()
    clipped_sum = torch.zeros(dimension, dtype=torch.float64)
    for k, identity in enumerate(ids[2:], start=2):  # two clients drop before masking
        clipped, _ = clip_update(updates[k], clip)
        clipped_sum += clipped["w"]
        noisy = add_gaussian_noise(clipped, client_std)
        vector = encode_weighted_update(
            noisy, 1.0, max_weight=1.0, layout=layout, encoding=encoding
        )
        server.add_masked_input(
            identity,
            clients[identity].masked_input(
                vector, server.shares_for(identity), server.contributors
            ),
        )
    request = _agreed(server, clients)
    for identity in request.survivors:
        server.add_unmask_response(identity, clients[identity].unmask(request))
    decoded = encoding.decode(server.result())
    survivors = n - 2
    assert decoded[-1] == pytest.approx(survivors)  # the weight slot: the number of survivors
    noise = torch.from_numpy(decoded[:-1]) - clipped_sum
    expected_std = sum_noise_std(z, clip) * (survivors / threshold) ** 0.5
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.03)
    assert abs(float(noise.mean())) < 4 * expected_std / dimension**0.5


def test_masked_vectors_travel_as_raw_little_endian_bytes() -> None:
    _, clients, server = _through_masking(drop_after_shares={4})
    params = clients["c4"].params
    masked = clients["c4"].masked_input(
        np.arange(16, dtype=np.uint64), server.shares_for("c4"), server.contributors
    )
    received = params.vector_from_bytes(masked.tobytes())
    assert np.array_equal(received, masked)
    server.add_masked_input("c4", received)  # read-only input is fine: the sum is the server's
    with pytest.raises(SecAggError, match="a masked vector is 128 bytes, got 127"):
        params.vector_from_bytes(masked.tobytes()[:-1])


def test_steps_out_of_order_are_refused() -> None:
    params = SecAggParams(session="s", threshold=2, vector_length=4)
    client = SecAggClient("a", params)
    with pytest.raises(SecAggError, match="out of order"):
        client.masked_input(np.zeros(4, dtype=np.uint64), {}, ("a",))
    with pytest.raises(ValueError, match="threshold must be >= 2"):
        SecAggParams(session="s", threshold=1, vector_length=4)


# SecAgg+: each client shares keys and masks with k neighbours of a ring drawn from the roster.


def _plus(
    n: int, k: int, t_k: int, threshold: int | None = None
) -> tuple[Session, dict[str, KeyAdvertisement], SessionGraph]:
    session, roster = _advertised(n, threshold or n // 2 + 1, neighbours=k, neighbour_threshold=t_k)
    return session, roster, SessionGraph.of(session.server.params, roster)


def _through_plus_masking(session: Session, roster: dict[str, KeyAdvertisement]) -> UnmaskRequest:
    """Every client shares keys and sends a masked arange; the coordinator's unmask request."""
    server = session.server
    for identity in session.ids:
        server.add_shares(identity, session.clients[identity].share_keys(roster))
    server.close_sharing()
    for identity in session.ids:
        masked = session.clients[identity].masked_input(
            np.arange(server.params.vector_length, dtype=np.uint64),
            server.shares_for(identity),
            server.contributors,
        )
        server.add_masked_input(identity, masked)
    return server.close_masked_inputs()


def _positions(session: Session, graph: SessionGraph, *places: int) -> set[int]:
    """The indices into `session.ids` of the clients at these places of the ring."""
    return {session.ids.index(graph.ring[place]) for place in places}


def test_every_party_derives_the_same_k_regular_ring_from_the_session_and_roster() -> None:
    session, roster, graph = _plus(12, 4, 3)
    assert graph.sparse and graph.share_threshold == 3
    assert sorted(graph.ring) == session.ids and graph.ring != tuple(session.ids)
    for place, u in enumerate(graph.ring):
        ring = graph.ring
        assert graph.neighbours[u] == {ring[(place + step) % 12] for step in (-2, -1, 1, 2)}
    # Each party computes it from what it received: the same roster in any order gives the
    # same graph, and each client's share bundles go exactly to its neighbours in it.
    shuffled = dict(reversed(list(roster.items())))
    assert SessionGraph.of(session.server.params, shuffled) == graph
    for identity, client in session.clients.items():
        assert set(client.share_keys(roster)) == graph.neighbours[identity]
    # Another session id, or one fresh key anywhere in the roster, draws another ring.
    other_session = replace(session.server.params, session="federation-a/round-3/task-10")
    assert SessionGraph.of(other_session, roster).ring != graph.ring
    fresh = SecAggClient("site-05", session.server.params).advertise()
    assert SessionGraph.of(session.server.params, {**roster, "site-05": fresh}).ring != graph.ring


def test_a_roster_of_at_most_k_plus_one_clients_uses_the_complete_graph() -> None:
    session, roster, graph = _plus(5, 4, 3, threshold=3)
    assert not graph.sparse and graph.share_threshold == 3
    assert all(len(graph.neighbours[u]) == 4 for u in session.ids)
    # ... and the complete graph's threshold check: 3 of 6 is not a majority.
    session, roster, graph = _plus(6, 6, 4, threshold=3)
    assert not graph.sparse
    with pytest.raises(SecAggRefused, match="must be at least 4"):
        session.clients["site-00"].share_keys(roster)


@pytest.mark.parametrize(("n", "k", "t_k"), [(12, 4, 3), (20, 6, 4)])
def test_secagg_plus_sum_is_exact_and_each_client_touches_only_its_neighbours(
    n: int, k: int, t_k: int
) -> None:
    states, weights = _states(n, seed=20 + n)
    session, roster, graph = _plus(n, k, t_k)
    _, total, layout, encoding = _finish(session, roster, states, weights)
    _check_matches_fedavg(total, layout, encoding, states, weights, list(range(n)))
    for identity in session.ids:
        group = graph.group(identity)
        # k share bundles out and k in, and unmasking shares only of itself and its neighbours.
        assert set(session.sent_shares[identity]) == graph.neighbours[identity]
        assert set(session.received_shares[identity]) == graph.neighbours[identity]
        response = session.responses[identity]
        assert set(response.self_mask_shares) == group and not response.mask_key_shares


def test_secagg_plus_recovers_dropouts_after_advertising_and_after_masked_input() -> None:
    # 12 clients, 4 neighbours, t_k = 3. On the ring: place 0 leaves after advertising its keys,
    # place 6 after sharing them (its masks are in its neighbours' inputs), place 3 after
    # sending its masked input. Every survivor's seed and place 6's mask key keep >= 3 shares.
    n = 12
    states, weights = _states(n, seed=30)
    session, roster, graph = _plus(n, 4, 3, threshold=7)
    gone_early, gone_mid, silent = (_positions(session, graph, p) for p in (0, 6, 3))
    _, total, layout, encoding = _finish(
        session,
        roster,
        states,
        weights,
        drop_after_keys=gone_early,
        drop_after_shares=gone_mid,
        drop_after_masked=silent,
    )
    included = sorted(set(range(n)) - gone_early - gone_mid)
    _check_matches_fedavg(total, layout, encoding, states, weights, included)
    (dropped,) = (session.ids[k] for k in gone_mid)
    holders = [r for r in session.responses.values() if dropped in r.mask_key_shares]
    assert len(holders) == 4  # its neighbours that answered, none of the others


def test_secagg_plus_fails_cleanly_when_a_needed_secret_lacks_t_k_shares() -> None:
    # Three neighbours in a row go silent after their masked input: each one's seed has only
    # 2 holders left answering, below t_k = 3, though 9 of 12 answered, far more than the
    # global threshold 7.
    n = 12
    states, weights = _states(n, seed=31)
    session, roster, graph = _plus(n, 4, 3, threshold=7)
    silent = _positions(session, graph, 1, 2, 3)
    with pytest.raises(
        SecAggError,
        match=rf"the self-mask seed of '({'|'.join(graph.ring[1:4])})': cannot reconstruct a "
        "secret from 2 shares: the threshold is 3",
    ):
        _finish(session, roster, states, weights, drop_after_masked=silent)


def test_secagg_plus_refuses_survivors_that_fall_apart_into_separately_summable_groups() -> None:
    # A ring of 8 with 2 neighbours each: if places 0 and 4 are counted as dropped, places 1-3
    # and 5-7 are two groups no pairwise mask joins, and each group's sum could be unmasked.
    # (Dropped before masking, their neighbours would already refuse to mask against 1 peer.)
    n = 8
    session, roster, graph = _plus(n, 2, 2, threshold=5)
    ring = graph.ring
    request = UnmaskRequest(
        survivors=tuple(sorted(set(ring) - {ring[0], ring[4]})), dropped=(ring[0], ring[4])
    )
    honest = _through_plus_masking(session, roster)
    assert set(honest.survivors) == set(ring)
    # A client refuses the split survivor set from a coordinator that asks anyway.
    with pytest.raises(SecAggRefused, match="fall apart into groups"):
        session.clients[ring[1]].agree(request, b"setup")
    # And the coordinator's own side refuses to ask when those two never sent masked inputs.
    server = SecAggServer(session.server.params)
    for identity in session.ids:
        server.add_keys(identity, roster[identity])
    server.close_advertisement()
    for identity in session.ids:
        server.add_shares(identity, {peer: b"" for peer in graph.neighbours[identity]})
    server.close_sharing()
    for identity in request.survivors:
        server.add_masked_input(identity, np.zeros(server.params.vector_length, dtype=np.uint64))
    with pytest.raises(SecAggError, match="fall apart into groups"):
        server.close_masked_inputs()


def test_a_client_refuses_a_neighbourhood_threshold_of_half_its_neighbours_or_less() -> None:
    session, roster, _ = _plus(10, 4, 2)
    with pytest.raises(SecAggRefused, match="neighbourhood threshold 2 is at most half of the 4"):
        session.clients["site-00"].share_keys(roster)
    with pytest.raises(ValueError, match=r"neighbours must be 0 \(the complete graph\) or an even"):
        SecAggParams(session="s", threshold=2, vector_length=4, neighbours=3)
    with pytest.raises(ValueError, match=r"neighbourhood threshold must be in 2\.\.5"):
        SecAggParams(session="s", threshold=2, vector_length=4, neighbours=4, neighbour_threshold=6)


def test_a_secagg_plus_client_reveals_one_kind_per_neighbour_and_nothing_of_others() -> None:
    session, roster, graph = _plus(10, 4, 3)
    ring = graph.ring
    me, neighbour = ring[0], ring[1]
    stranger = ring[5]  # not a neighbour of ring[0]
    request = _through_plus_masking(session, roster)
    client = session.clients[me]
    everyone = tuple(session.ids)
    assert request.survivors == everyone
    client.agree(request, b"setup")
    honest = client.unmask(request)
    assert set(honest.self_mask_shares) == graph.group(me)
    assert stranger not in honest.self_mask_shares
    # Claiming a neighbour dropped, to get its mask key share too, is refused.
    lying = UnmaskRequest(
        survivors=tuple(u for u in everyone if u != neighbour), dropped=(neighbour,)
    )
    with pytest.raises(SecAggRefused, match="differs from the survivor set this client signed"):
        client.unmask(lying)
    # A non-neighbour named as dropped is passed over: the client holds nothing of it.
    other = UnmaskRequest(
        survivors=tuple(u for u in everyone if u != stranger), dropped=(stranger,)
    )
    assert stranger not in graph.group(neighbour)
    session.clients[neighbour].agree(other, b"setup")
    answer = session.clients[neighbour].unmask(other)
    assert not answer.mask_key_shares and stranger not in answer.self_mask_shares
    # A name outside the announced U2 is refused, as with the complete graph.
    with pytest.raises(SecAggRefused, match="exactly the clients announced"):
        session.clients[ring[2]].agree(
            UnmaskRequest(survivors=everyone, dropped=("mallory",)), b"setup"
        )


def test_one_corrupt_responder_is_found_per_secret_given_t_k_plus_two_shares_of_each() -> None:
    # 12 clients, 6 neighbours, t_k = 4: every secret has 7 holders, all answer (>= t_k + 2).
    n = 12
    session, roster, graph = _plus(n, 6, 4)
    server = session.server
    request = _agree_to(_through_plus_masking(session, roster), server, session.clients)
    culprit = graph.ring[3]
    victim = graph.ring[4]
    for identity in request.survivors:
        response = session.clients[identity].unmask(request)
        if identity == culprit:
            share = response.self_mask_shares[victim]
            shares = dict(response.self_mask_shares)
            shares[victim] = Share(share.x, (share.y + 1) % (1 << 521))
            response = UnmaskResponse(shares, response.mask_key_shares)
        server.add_unmask_response(identity, response)
    total = server.result()
    assert server.corrupt_responders == [culprit]
    assert np.array_equal(total, n * np.arange(server.params.vector_length, dtype=np.uint64))
