"""A malicious coordinator against real client code.

`Cheat` is test-only: it plays the coordinator's part of secure aggregation over the real wire
bytes, but decides per client what each one sees (setup, roster, relayed share bundles,
announced contributors, survivor story). The clients are real `SecureParticipant`s (what
`fedlink client` runs) with real federation certificates. Each test makes the cheat of issue 12
and checks it is refused, or that what the coordinator can rebuild is not the victim's encoded
vector.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedlink.client.secure import PrivacyFloor, SecureParticipant, encode_update
from fedlink.common import prg
from fedlink.common.dp import client_noise_std, secure_value_bound
from fedlink.common.errors import BelowPrivacyFloor, ConfigError, SecAggRefused
from fedlink.common.fixedpoint import FixedPoint, UpdateLayout
from fedlink.common.pki import load_credentials
from fedlink.common.secagg import (
    KeyAdvertisement,
    RingVector,
    SecAggParams,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlink.common.secagg_wire import (
    SessionSetup,
    keys_from_bytes,
    roster_to_bytes,
    shares_from_bytes,
    shares_to_bytes,
    unmask_request_to_bytes,
    unmask_response_from_bytes,
    view_signature_from_bytes,
)
from fedlink.common.shamir import reconstruct_secret
from fedlink.common.tensors import StateDict, manifest_of
from fedlink.v1 import federation_pb2 as pb

MODEL = b"global-model-digest"


def _state(seed: int) -> StateDict:
    return {
        "w": torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    }


def _setup(
    session: str, threshold: int, clients: int, *, clip: float = 0.0, multiplier: float = 0.0
) -> SessionSetup:
    length = UpdateLayout(manifest_of(_state(0))).length
    if clip:
        noise = client_noise_std(multiplier, clip, threshold) if multiplier else 0.0
        bound = max(1.0, secure_value_bound(clip, noise, length))
        encoding = FixedPoint.for_sum(num_clients=clients, value_bound=bound)
        return SessionSetup(SecAggParams(session, threshold, length), encoding, 1.0, noise, clip)
    encoding = FixedPoint.for_sum(num_clients=clients, value_bound=100.0)
    return SessionSetup(SecAggParams(session, threshold, length), encoding, 100.0)


class Cheat:
    """The coordinator's side, relaying real wire messages, with a per-client view of each step."""

    def __init__(self, pki: Any, names: list[str], floor: PrivacyFloor | None = None) -> None:
        floor = floor or PrivacyFloor()
        self.names = names
        self.clients = {
            name: SecureParticipant(name, load_credentials(*pki.client(name), role="client"), floor)
            for name in names
        }
        self.keys: dict[str, KeyAdvertisement] = {}
        self.outboxes: dict[str, dict[str, bytes]] = {}
        self.masked: dict[str, RingVector] = {}
        self.signatures: dict[str, bytes] = {}
        self.setups: dict[str, SessionSetup] = {}

    def advertise(
        self, setups: Mapping[str, SessionSetup], vectors: Mapping[str, RingVector]
    ) -> None:
        self.setups = dict(setups)
        for name in self.names:
            answer = self.clients[name].advertise(setups[name], vectors[name], 1, MODEL)
            self.keys[name] = keys_from_bytes(answer)

    def share_keys(self, rosters: Mapping[str, list[str]] | None = None) -> None:
        for name in self.names:
            roster = {u: self.keys[u] for u in (rosters or {}).get(name, self.names)}
            answer = self._respond(name, pb.TASK_KIND_SECAGG_SHARE_KEYS, roster_to_bytes(roster))
            self.outboxes[name] = shares_from_bytes(answer)

    def masked_input(self, senders: Mapping[str, list[str]] | None = None) -> None:
        """Each client gets bundles from `senders[name]` (default: everyone), announced as U2."""
        for name in self.names:
            chosen = (senders or {}).get(name, self.names)
            inbox = {s: self.outboxes[s][name] for s in chosen if s != name}
            data = shares_to_bytes(inbox, chosen)
            answer = self._respond(name, pb.TASK_KIND_SECAGG_MASKED_INPUT, data)
            self.masked[name] = self.setups[name].params.vector_from_bytes(answer)

    def consistency(self, stories: Mapping[str, UnmaskRequest]) -> None:
        for name, story in stories.items():
            answer = self._respond(
                name, pb.TASK_KIND_SECAGG_CONSISTENCY, unmask_request_to_bytes(story)
            )
            self.signatures[name] = view_signature_from_bytes(answer)

    def unmask(self, stories: Mapping[str, UnmaskRequest]) -> dict[str, UnmaskResponse | str]:
        """Each client's story with every signature the cheat holds: a response, or the refusal."""
        outcomes: dict[str, UnmaskResponse | str] = {}
        for name, story in stories.items():
            request = replace(story, signatures=dict(self.signatures))
            try:
                answer = self._respond(
                    name, pb.TASK_KIND_SECAGG_UNMASK, unmask_request_to_bytes(request)
                )
            except SecAggRefused as exc:
                outcomes[name] = str(exc)
            else:
                outcomes[name] = unmask_response_from_bytes(answer)
        return outcomes

    def _respond(self, name: str, kind: pb.TaskKind, data: bytes) -> bytes:
        return self.clients[name].respond(kind, self.setups[name], data)


def _vectors(setups: Mapping[str, SessionSetup]) -> dict[str, RingVector]:
    base = _state(0)
    return {
        name: encode_update(setup, _state(k + 1), base, 10)
        for k, (name, setup) in enumerate(setups.items())
    }


def _recover(
    victim: str,
    masked: RingVector,
    outcomes: Mapping[str, UnmaskResponse | str],
    threshold: int,
) -> RingVector | None:
    """What the cheat can strip from the victim's masked input with the shares it was given:
    its self mask needs `threshold` shares of the victim's seed; without them, nothing."""
    responses = [o for o in outcomes.values() if isinstance(o, UnmaskResponse)]
    seed_shares = [r.self_mask_shares[victim] for r in responses if victim in r.self_mask_shares]
    if len(seed_shares) < threshold:
        return None
    seed = reconstruct_secret(seed_shares, threshold)
    stripped = masked.copy()
    prg.add_keystream(seed, stripped, subtract=True)
    return stripped


def test_a_victim_given_share_bundles_from_too_few_peers_refuses_to_mask(pki: Any) -> None:
    # 5 clients, threshold 3. The coordinator relays to the victim bundles from only 2 peers
    # (t - 1; with itself that made t, which the client used to accept) and announces U2 as
    # those three, hoping to strip its input later with those 2 peers' keys.
    names = [f"site-{i}" for i in range(5)]
    cheat = Cheat(pki, names)
    setup = _setup("isolate", 3, 5)
    setups = dict.fromkeys(names, setup)
    cheat.advertise(setups, _vectors(setups))
    cheat.share_keys()
    victim = cheat.clients["site-0"]
    inbox = {s: cheat.outboxes[s]["site-0"] for s in ("site-1", "site-2")}
    few = shares_to_bytes(inbox, ["site-0", "site-1", "site-2"])
    with pytest.raises(SecAggRefused, match=r"only 2 peers shared keys; .* at least 3"):
        victim.respond(pb.TASK_KIND_SECAGG_MASKED_INPUT, setup, few)
    # Announcing everyone but relaying the same two bundles is refused as well.
    withheld = shares_to_bytes(inbox, names)
    with pytest.raises(SecAggRefused, match="announced share bundles from"):
        victim.respond(pb.TASK_KIND_SECAGG_MASKED_INPUT, setup, withheld)


def test_isolating_a_victim_with_per_client_survivor_stories_releases_nothing(pki: Any) -> None:
    # 7 clients, threshold 4. The victim gets bundles from exactly 4 peers P (enough now) and is
    # told U2 = itself and P; everyone else sees all 7. Then each client is told its own story:
    # the victim survived (its seed shares released), some of P dropped (their mask keys
    # released), rotating so that every peer of P is "dropped" to enough holders. Every story
    # passes the client's own checks, so all sign; but a survivor's signature covers its own
    # view, and no holder's view matches the victim's, so every holder refuses to unmask.
    names = [f"site-{i}" for i in range(7)]
    victim, peers = names[0], names[1:5]
    cheat = Cheat(pki, names)
    setup = _setup("stories", 4, 7)
    setups = dict.fromkeys(names, setup)
    vectors = _vectors(setups)
    cheat.advertise(setups, vectors)
    cheat.share_keys()
    cheat.masked_input({victim: [victim, *peers]})
    everyone = set(names)
    stories: dict[str, UnmaskRequest] = {victim: UnmaskRequest(tuple(sorted({victim, *peers})), ())}
    for k, holder in enumerate(names[1:]):
        dropped = {p for p in peers if p != holder}
        dropped = set(sorted(dropped)[k % 2 :][:3])  # at most 3 dropped: 4 survivors remain
        stories[holder] = UnmaskRequest(tuple(sorted(everyone - dropped)), tuple(sorted(dropped)))
    cheat.consistency(stories)
    assert set(cheat.signatures) == everyone  # each story alone looked fine to its client
    outcomes = cheat.unmask(stories)
    for holder in names[1:]:
        assert isinstance(outcomes[holder], str)
        assert "signed another view" in str(outcomes[holder])
    assert _recover(victim, cheat.masked[victim], outcomes, 4) is None
    assert not np.array_equal(cheat.masked[victim], vectors[victim])


@pytest.mark.parametrize("cheat_kind", ["threshold", "roster"])
def test_clients_told_different_thresholds_or_rosters_never_unmask(
    pki: Any, cheat_kind: str
) -> None:
    # 5 clients. The coordinator tells the victim a different setup (threshold 4 instead of 3)
    # or a roster without one client, while everyone else sees the honest session; then one
    # honest survivor story for all. Signatures over differing views never match.
    names = [f"site-{i}" for i in range(5)]
    victim = names[0]
    cheat = Cheat(pki, names)
    honest = _setup("views", 3, 5)
    setups = dict.fromkeys(names, honest)
    if cheat_kind == "threshold":
        setups[victim] = _setup("views", 4, 5)
    vectors = _vectors(setups)
    cheat.advertise(setups, vectors)
    rosters = {victim: names[:4]} if cheat_kind == "roster" else {}
    cheat.share_keys(rosters)
    seen = names[:4] if cheat_kind == "roster" else names
    # Without the victim's bundle for site-4, site-4 is told U2 without the victim.
    announced = {victim: seen, names[4]: names[1:]} if cheat_kind == "roster" else {}
    cheat.masked_input(announced)
    stories = {name: UnmaskRequest(tuple(announced.get(name, names)), ()) for name in names}
    cheat.consistency(stories)
    outcomes = cheat.unmask(stories)
    assert all(isinstance(outcome, str) for outcome in outcomes.values()), outcomes
    assert all("signed another view" in str(outcome) for outcome in outcomes.values())
    assert _recover(victim, cheat.masked[victim], outcomes, 3) is None


def test_the_honest_session_through_the_cheats_relay_unmasks(pki: Any) -> None:
    # The control: the same relay telling everyone the same story gets every response, so the
    # refusals above come from the cheats, not from the harness.
    names = [f"site-{i}" for i in range(5)]
    cheat = Cheat(pki, names)
    setup = _setup("control", 3, 5)
    setups = dict.fromkeys(names, setup)
    cheat.advertise(setups, _vectors(setups))
    cheat.share_keys()
    cheat.masked_input()
    stories = dict.fromkeys(names, UnmaskRequest(tuple(names), ()))
    cheat.consistency(stories)
    outcomes = cheat.unmask(stories)
    assert all(isinstance(outcome, UnmaskResponse) for outcome in outcomes.values())


def test_a_retried_round_gets_no_second_masked_input_to_subtract(pki: Any) -> None:
    # A first attempt with the victim, then a "retry" of the same round: the same model and
    # setup, so without DP the victim would encode a byte-identical vector and sum(V + R) -
    # sum(R) would be its update. The victim declines any second attempt at the round, also
    # when the coordinator renumbers it but sends the same global model.
    names = [f"site-{i}" for i in range(3)]
    cheat = Cheat(pki, names)
    first = _setup("attempt-1", 2, 3)
    setups = dict.fromkeys(names, first)
    vectors = _vectors(setups)
    cheat.advertise(setups, vectors)
    cheat.share_keys()
    cheat.masked_input()
    victim = cheat.clients["site-0"]
    second = _setup("attempt-2", 2, 3)
    again = encode_update(second, _state(1), _state(0), 10)
    assert np.array_equal(again, vectors["site-0"])  # what a retry would have subtracted
    # Masked but not yet signed: no honest holder can unmask that session, so a repeat of the
    # round (a coordinator that crashed before the consistency step) is still served.
    victim.admit(second, 1, MODEL)
    cheat.consistency(dict.fromkeys(names, UnmaskRequest(tuple(names), ())))
    with pytest.raises(SecAggRefused, match="already signed the survivors of 1 session"):
        victim.advertise(second, again, 1, MODEL)
    with pytest.raises(SecAggRefused, match="already signed the survivors of 1 session"):
        victim.advertise(second, again, 2, MODEL)  # renumbered, same model
    victim.advertise(second, again, 2, b"next-global-model")  # the next round is fine


def test_a_restarted_client_still_refuses_a_second_attempt_at_the_same_model(
    pki: Any, tmp_path: Path
) -> None:
    # The count of signed sessions outlives the process when the site has a state_dir: a
    # coordinator cannot get a second signed attempt at the same global model by waiting for
    # (or provoking) a client restart. Without one the count is in memory only.
    names = [f"site-{i}" for i in range(3)]
    record = tmp_path / "secagg-signed-site-0.json"
    cheat = Cheat(pki, names)
    credentials = load_credentials(*pki.client("site-0"), role="client")
    cheat.clients["site-0"] = SecureParticipant("site-0", credentials, PrivacyFloor(), record)
    setups = dict.fromkeys(names, _setup("attempt-1", 2, 3))
    cheat.advertise(setups, _vectors(setups))
    cheat.share_keys()
    cheat.masked_input()
    cheat.consistency(dict.fromkeys(names, UnmaskRequest(tuple(names), ())))
    assert MODEL.hex() in record.read_text()
    second = _setup("attempt-2", 2, 3)
    restarted = SecureParticipant("site-0", credentials, PrivacyFloor(), record)
    with pytest.raises(SecAggRefused, match="already signed the survivors of 1 session"):
        restarted.admit(second, 1, MODEL)
    restarted.admit(second, 1, b"next-global-model")
    SecureParticipant("site-0", credentials).admit(second, 1, MODEL)  # no state_dir: forgotten
    record.write_text('{"model:00": "many"}')
    with pytest.raises(ConfigError, match="not a fedlink record of signed sessions"):
        SecureParticipant("site-0", credentials, PrivacyFloor(), record)


def test_with_dp_every_attempt_carries_fresh_noise(pki: Any) -> None:
    # A site that allows two attempts per round under DP: the two encoded vectors differ by
    # fresh noise, so their difference is not the update.
    setup = _setup("dp", 2, 3, clip=1.0, multiplier=1.0)
    first = encode_update(setup, _state(1), _state(0), 10)
    second = encode_update(setup, _state(1), _state(0), 10)
    difference = setup.encoding.decode(first - second)[:-1]
    expected = np.sqrt(2) * setup.noise_std
    assert abs(float(np.std(difference)) - expected) < 0.35 * expected


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (_setup("no-dp", 3, 5), "without DP clipping and noise"),
        (_setup("no-noise", 3, 5, clip=1.0, multiplier=0.0), "noise multiplier of 0"),
        (_setup("little-noise", 3, 5, clip=1.0, multiplier=0.5), "noise multiplier of 0.5"),
        (_setup("small-t", 2, 3, clip=1.0, multiplier=1.0), "as few as 2 clients"),
    ],
    ids=["clip-0", "noise-0", "noise-halved", "threshold-below-floor"],
)
def test_a_coordinator_below_the_sites_privacy_floor_is_refused(
    pki: Any, setup: SessionSetup, message: str
) -> None:
    floor = PrivacyFloor(min_clients=5, min_threshold=3, min_noise_multiplier=1.0)
    client = SecureParticipant(
        "site-0", load_credentials(*pki.client("site-0"), role="client"), floor
    )
    with pytest.raises(BelowPrivacyFloor, match=message):
        client.admit(setup, 1, MODEL)
    vector = np.zeros(setup.params.vector_length, dtype=setup.params.dtype)
    with pytest.raises(BelowPrivacyFloor, match=message):
        client.advertise(setup, vector, 1, MODEL)


def test_a_roster_below_the_sites_minimum_cohort_is_refused(pki: Any) -> None:
    names = [f"site-{i}" for i in range(3)]
    cheat = Cheat(pki, names, PrivacyFloor(min_clients=4))
    setups = dict.fromkeys(names, _setup("small", 2, 3))
    cheat.advertise(setups, _vectors(setups))
    with pytest.raises(BelowPrivacyFloor, match=r"roster has 3 clients; .* is 4"):
        cheat.share_keys()


def test_an_unmask_request_without_the_survivors_signatures_is_refused(pki: Any) -> None:
    names = [f"site-{i}" for i in range(3)]
    cheat = Cheat(pki, names)
    setups = dict.fromkeys(names, _setup("unsigned", 2, 3))
    cheat.advertise(setups, _vectors(setups))
    cheat.share_keys()
    cheat.masked_input()
    stories = dict.fromkeys(names, UnmaskRequest(tuple(names), ()))
    cheat.consistency(stories)
    cheat.signatures.pop("site-2")
    outcomes = cheat.unmask(stories)
    assert all("'site-2' did not sign" in str(o) for o in outcomes.values())
