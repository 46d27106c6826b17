"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020) that holds
against a malicious coordinator.

The coordinator learns the sum of the clients' ring vectors (see fixedpoint.py) and nothing else
about any one of them, even when clients drop out, as long as at least `threshold` remain, and
even when it lies to clients about who took part (the consistency step below).

Who shares keys and masks with whom is the session's graph (`SessionGraph`): by default the
complete graph (every client with every other, the CCS 2017 protocol, as written below); with
`SecAggParams.neighbours` = k > 0 (SecAgg+), the Harary graph H(k, n): the roster on a ring in
an order drawn from a digest of the session id and every advertised key, each client joined to
the k / 2 nearest on either side. Every party derives it from the roster; none takes it from the
wire. Then "U1" in steps 2 to 4 reads "the client and its neighbours in U1" (likewise U2, U3),
the Shamir threshold is `neighbour_threshold` t_k among those k + 1 holders, and the
coordinator's unmasking is O(n k) instead of O(n^2).

The five steps, each a message through the coordinator (which only relays and sums):
1. advertise: each client sends two X25519 public keys, one to encrypt shares (c) and one to
   agree pairwise masks (s). The coordinator's list of them is the roster U1.
2. share keys: each client draws a self-mask seed b_u and Shamir-shares both b_u and its mask
   private key s_u among U1 (threshold t). Each share travels to its holder encrypted and
   authenticated with a key agreed between the c keys, so the coordinator cannot read it.
   U2 = the clients whose shares arrived; the coordinator announces U2 with the relayed shares,
   and a client refuses unless it received a bundle from each of its neighbours in U2 and those
   are at least the share threshold, not counting itself.
3. masked input: y_u = x_u + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v in U2, v < u} PRG(s_uv)
   (mod 2^k), s_uv being HKDF of the X25519 agreement of s_u and s_v bound to the session and both
   identities. Pairwise masks cancel in the sum; the self mask hides y_u even if the coordinator
   later learns s_uv for a peer it (wrongly) declared dropped. U3 = the clients whose y_u arrived.
4. consistency (the malicious-server variant of the paper): each survivor checks that U3 and
   U2 \\ U3 are exactly the U2 it was told, and signs its whole view (`view_statement`: setup,
   roster with every key, U2, U3) with its client certificate, once per session.
5. unmask: a client goes on only if every survivor's signature over its own view verifies
   (secagg_auth.py): then all of U3, at least t > |U1| / 2 clients, saw the same setup, roster, U2
   and U3, so no client of the sum masked against another U2 than the rest, and no survivor can be
   told it survived in one story and have its peers dropped in another. Then each survivor reveals its share of b_u for every u in U3 and its share of s_u for every
   u in U2 \\ U3, never both kinds for one peer (`ShareGuard`). From t shares of each the
   coordinator removes the self masks of U3 and the pairwise masks the dropped clients left.

Every key comes from a full 32-byte secret and every mask from the ChaCha20 stream of such a key
(prg.py). Clients also refuse a threshold of at most half the roster: with t > |U1| / 2 no two
disjoint groups of t clients exist, so even a coordinator that tells clients different stories
about who dropped cannot collect t shares of both kinds for one client. With neighbourhoods the
same holds per client: clients refuse t_k <= k / 2, a minority of its k + 1 holders. They also
refuse to unmask survivors that the graph does not connect: the coordinator could then unmask
each component's sum on its own. Every survivor must sign (not only t of them, as in the paper):
a survivor's own signature is what shows it masked against the same U2 as the others, so one
that drops out between its masked input and the consistency step fails the attempt.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedlink.common import prg
from fedlink.common.errors import SecAggError, SecAggRefused
from fedlink.common.fixedpoint import RING_BITS
from fedlink.common.shamir import SHARE_BYTES, Share, reconstruct_secret, split_secret

PROTOCOL = b"fedlink-secagg-v1"
PUBLIC_KEY_BYTES = 32
_ZERO_NONCE = bytes(12)
_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw

RingVector = NDArray[np.unsignedinteger]


@dataclass(frozen=True)
class SecAggParams:
    """What every participant of one secure-aggregation session agrees on.

    `session` must be unique per federation and round (e.g. the round's task id): it is bound
    into every derived key, so keys and masks of one round are useless in any other.

    `threshold` is the fewest clients whose inputs the coordinator may sum. With `neighbours`
    = k > 0 (SecAgg+) each client shares its secrets with and masks against only its k
    neighbours in the session's graph (`SessionGraph`), and any `neighbour_threshold` t_k of
    the k + 1 holders (the client and its neighbours) rebuild them; `majority_of` gives the
    smallest t_k clients accept. With k = 0, or a roster of at most k + 1 clients, the graph is
    complete and `threshold` is the Shamir threshold as well.
    """

    session: str
    threshold: int
    vector_length: int
    ring_bits: int = 64
    neighbours: int = 0
    neighbour_threshold: int = 0

    def __post_init__(self) -> None:
        if not self.session:
            raise ValueError("the secure-aggregation session id must not be empty")
        if self.threshold < 2:
            raise ValueError(f"the threshold must be >= 2, got {self.threshold}")
        if self.neighbours < 0 or self.neighbours % 2:
            raise ValueError(
                f"neighbours must be 0 (the complete graph) or an even number >= 2, got {self.neighbours}"
            )
        if self.neighbours and not 2 <= self.neighbour_threshold <= self.neighbours + 1:
            raise ValueError(
                f"the neighbourhood threshold must be in 2..{self.neighbours + 1} (a client and its "
                f"{self.neighbours} neighbours hold its shares), got {self.neighbour_threshold}"
            )
        if not self.neighbours and self.neighbour_threshold:
            raise ValueError("a neighbourhood threshold needs neighbours > 0")
        if self.vector_length < 1:
            raise ValueError(f"the vector length must be >= 1, got {self.vector_length}")
        if self.ring_bits not in RING_BITS:
            raise ValueError(f"ring_bits must be one of {RING_BITS}, got {self.ring_bits}")

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """Little-endian uint32 or uint64: the ring's elements, also as they travel."""
        return np.dtype("<u4" if self.ring_bits == 32 else "<u8")

    def vector_from_bytes(self, data: bytes) -> RingVector:
        """A ring vector received as raw little-endian bytes (`vector.tobytes()`), read-only."""
        expected = self.vector_length * self.dtype.itemsize
        if len(data) != expected:
            raise SecAggError(f"a masked vector is {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=self.dtype)


def majority_of(neighbours: int) -> int:
    """The smallest neighbourhood threshold clients accept: a strict majority of the k + 1
    holders of a client's shares (k even), so no two disjoint groups of holders reach it."""
    return neighbours // 2 + 1


@dataclass(frozen=True)
class KeyAdvertisement:
    """A client's two X25519 public keys (raw 32 bytes each), and what binds them to the client:
    its certificate (PEM) and its signature over `advertisement_statement` (secagg_auth.py;
    empty in --insecure development mode)."""

    cipher_key: bytes
    mask_key: bytes
    certificate: bytes = b""
    signature: bytes = b""

    def same_keys(self, other: KeyAdvertisement) -> bool:
        return (self.cipher_key, self.mask_key) == (other.cipher_key, other.mask_key)


@dataclass(frozen=True)
class UnmaskRequest:
    """The coordinator's view after step 3: whose masked input it holds and who dropped; in the
    unmask step also every survivor's signature over its view (identity -> signature)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signatures: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskResponse:
    """One survivor's shares: of b_u for each surviving u, of s_u for each dropped u."""

    self_mask_shares: dict[str, Share] = field(default_factory=dict)
    mask_key_shares: dict[str, Share] = field(default_factory=dict)


class ShareKind(Enum):
    SELF_MASK = "self-mask seed"
    MASK_KEY = "mask key"


class ShareGuard:
    """Reveals, for each peer, shares of one kind only, for the whole session.

    A coordinator holding t shares of both b_u and s_u could strip every mask from u's input;
    the guard refuses the second kind whatever order or number of requests asks for it.
    """

    def __init__(self) -> None:
        self._revealed: dict[str, ShareKind] = {}

    def release(self, requests: Mapping[str, ShareKind]) -> None:
        """Record the release of `requests` (peer -> kind), all or nothing."""
        for peer, kind in requests.items():
            earlier = self._revealed.get(peer, kind)
            if earlier != kind:
                raise SecAggRefused(
                    f"refusing to reveal the {kind.value} share of {peer!r}: its "
                    f"{earlier.value} share was already revealed, and both together unmask its input"
                )
        self._revealed.update(requests)


@dataclass(frozen=True)
class SessionGraph:
    """Who shares keys and masks with whom in one session, derived from the roster U1 alone.

    Every party computes it itself, so the coordinator never chooses a client's neighbours
    after seeing the keys, and no client takes a neighbour list from the wire.
    """

    neighbours: Mapping[str, frozenset[str]]
    share_threshold: int  # shares of a client's secrets that rebuild them
    sparse: bool  # False: the complete graph (the CCS 2017 protocol)
    ring: tuple[str, ...]  # the clients in ring order (sorted for the complete graph)

    @classmethod
    def of(cls, params: SecAggParams, roster: Mapping[str, KeyAdvertisement]) -> SessionGraph:
        """The complete graph, or with `params.neighbours` = k and a roster of more than k + 1
        clients the Harary graph H(k, n): the clients on a ring in an order drawn from a digest
        of the session and the whole roster (identities and both keys of each), each joined to
        the k / 2 nearest on either side."""
        members = sorted(roster)
        k = params.neighbours
        if k == 0 or k >= len(members) - 1:
            everyone = frozenset(members)
            return cls(
                {u: everyone - {u} for u in members},
                params.threshold,
                sparse=False,
                ring=tuple(members),
            )
        ring = _ring_order(params.session, roster)
        place = {u: position for position, u in enumerate(ring)}
        n, half = len(ring), k // 2
        neighbours = {
            u: frozenset(ring[(place[u] + step) % n] for step in range(-half, half + 1) if step)
            for u in members
        }
        return cls(neighbours, params.neighbour_threshold, sparse=True, ring=tuple(ring))

    def group(self, identity: str) -> frozenset[str]:
        """`identity` and its neighbours: the holders of its shares, and whose shares it holds."""
        return self.neighbours[identity] | {identity}

    def connected(self, members: Collection[str]) -> bool:
        """Whether `members` induce a connected subgraph. The pairwise masks of survivors
        joined by an edge never leave the sum, so the coordinator can unmask exactly the sums
        of these components: one component means only the sum of all of them."""
        remaining = set(members)
        if not remaining:
            return True
        frontier = [remaining.pop()]
        while frontier:
            reached = self.neighbours[frontier.pop()] & remaining
            remaining -= reached
            frontier.extend(reached)
        return not remaining


def _ring_order(session: str, roster: Mapping[str, KeyAdvertisement]) -> list[str]:
    # A client's place depends on every advertised key, which its owner drew fresh after the
    # coordinator fixed the session id, so neither the session id nor any single client decides it.
    members = sorted(roster)
    parts = [
        part for u in members for part in (u, roster[u].cipher_key.hex(), roster[u].mask_key.hex())
    ]
    seed = hashlib.sha256(_context("neighbourhood-graph", session, *parts)).digest()
    return sorted(members, key=lambda u: (hashlib.sha256(seed + u.encode()).digest(), u))


def roster_indices(identities: Iterable[str]) -> dict[str, int]:
    """Each identity's Shamir x-coordinate: its 1-based position in sorted order."""
    return {identity: position for position, identity in enumerate(sorted(identities), start=1)}


def derive_key(secret: bytes, purpose: str, session: str, *parties: str) -> bytes:
    """A 32-byte key from an agreed secret, bound to the purpose, the session and the parties."""
    info = _context(purpose, session, *parties)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _context(purpose: str, session: str, *parties: str) -> bytes:
    # Length-prefixed, so no two different tuples of strings encode to the same bytes.
    info = bytearray(PROTOCOL)
    for part in (purpose, session, *parties):
        encoded = part.encode()
        info += len(encoded).to_bytes(4, "big") + encoded
    return bytes(info)


def advertisement_statement(session: str, identity: str, advertisement: KeyAdvertisement) -> bytes:
    """What a client signs when it advertises its keys: bound to the session and its identity,
    so a signature cannot be replayed into another round or for another client."""
    return (
        _context("key-advertisement", session, identity)
        + advertisement.cipher_key
        + advertisement.mask_key
    )


def view_statement(
    session: str,
    setup_digest: bytes,
    roster: Mapping[str, KeyAdvertisement],
    contributors: Collection[str],
    survivors: Collection[str],
) -> bytes:
    """What every survivor signs in the consistency step: the session's setup (its digest), the
    roster U1 with both keys of each client, U2 and U3. Clients that sign the same bytes saw the
    same session; a count before each list keeps the encoding unambiguous."""
    members = sorted(roster)
    keys = [
        part for u in members for part in (u, roster[u].cipher_key.hex(), roster[u].mask_key.hex())
    ]
    return _context(
        "session-view",
        session,
        setup_digest.hex(),
        str(len(members)),
        *keys,
        str(len(contributors)),
        *sorted(contributors),
        str(len(survivors)),
        *sorted(survivors),
    )


def pairwise_mask_key(
    private: X25519PrivateKey, peer_public: bytes, session: str, a: str, b: str
) -> bytes:
    """The PRG key of the pairwise mask between identities a and b (symmetric in a and b)."""
    low, high = sorted((a, b))
    return derive_key(_agree(private, peer_public), "pairwise-mask", session, low, high)


def _share_key(
    private: X25519PrivateKey, peer_public: bytes, session: str, sender: str, recipient: str
) -> bytes:
    return derive_key(_agree(private, peer_public), "share-encryption", session, sender, recipient)


def _agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggError(f"invalid X25519 public key: {exc}") from exc


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(_RAW, _RAW_PUBLIC)


def _associated_data(session: str, sender: str, recipient: str) -> bytes:
    return _context("share-bundle", session, sender, recipient)


def _check_vector(vector: RingVector, params: SecAggParams) -> None:
    if vector.dtype != params.dtype or vector.shape != (params.vector_length,):
        raise SecAggError(
            f"expected a ring vector of {params.vector_length} {params.dtype} entries, "
            f"got {vector.shape} {vector.dtype}"
        )


class _ClientPhase(Enum):
    ADVERTISE = 1
    SHARE = 2
    MASK = 3
    AGREE = 4
    UNMASK = 5


class SecAggClient:
    """One client's side of a session: fresh keys and self-mask seed, used for one round only."""

    def __init__(self, identity: str, params: SecAggParams) -> None:
        self.identity = identity
        self.params = params
        self._cipher_private = X25519PrivateKey.generate()
        self._mask_private = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(32)
        self._guard = ShareGuard()
        self._phase = _ClientPhase.ADVERTISE
        self._roster: dict[str, KeyAdvertisement] = {}
        self._indices: dict[str, int] = {}
        # peer -> (our share of its self-mask seed, our share of its mask key)
        self._held: dict[str, tuple[Share, Share]] = {}
        self._graph: SessionGraph | None = None
        self._contributors: frozenset[str] = frozenset()  # itself and its neighbours in U2
        self._announced: frozenset[str] = frozenset()  # U2 as the coordinator announced it
        self._agreed: UnmaskRequest | None = None  # the survivor set this client signed

    def advertise(self) -> KeyAdvertisement:
        self._expect(_ClientPhase.ADVERTISE)
        self._phase = _ClientPhase.SHARE
        return KeyAdvertisement(
            _public_bytes(self._cipher_private), _public_bytes(self._mask_private)
        )

    def share_keys(self, roster: Mapping[str, KeyAdvertisement]) -> dict[str, bytes]:
        """Encrypted shares of b_u and s_u for each of this client's neighbours in the roster U1
        (every other client of it in the complete graph)."""
        self._expect(_ClientPhase.SHARE)
        own = KeyAdvertisement(
            _public_bytes(self._cipher_private), _public_bytes(self._mask_private)
        )
        mine = roster.get(self.identity)
        if mine is None or not mine.same_keys(own):
            raise SecAggError(f"the roster does not carry {self.identity!r}'s own keys")
        threshold = self.params.threshold
        if len(roster) < threshold:
            raise SecAggError(
                f"{len(roster)} clients advertised keys; the threshold is {threshold}"
            )
        graph = SessionGraph.of(self.params, roster)
        if graph.sparse:
            k, t_k = self.params.neighbours, graph.share_threshold
            if t_k < majority_of(k):
                raise SecAggRefused(
                    f"neighbourhood threshold {t_k} is at most half of the {k} neighbours; it "
                    f"must be at least {majority_of(k)} so that no coordinator can collect both "
                    "kinds of share"
                )
        # Also with neighbourhoods: a survivor set that t > n / 2 clients signed is the only one
        # (no two disjoint groups of t exist), which the consistency step relies on.
        if 2 * threshold <= len(roster):
            raise SecAggRefused(
                f"threshold {threshold} is at most half of the {len(roster)} clients; it must be "
                f"at least {len(roster) // 2 + 1} so that no coordinator can collect both kinds of "
                "share or get two different survivor sets signed"
            )
        public_keys = [key for ad in roster.values() for key in (ad.cipher_key, ad.mask_key)]
        if len(set(public_keys)) != len(public_keys):
            raise SecAggError("the roster repeats a public key; every key must be fresh")
        self._roster = dict(roster)
        self._graph = graph
        self._indices = roster_indices(roster)
        holders = sorted(graph.group(self.identity))
        xs = [self._indices[holder] for holder in holders]
        mask_secret = self._mask_private.private_bytes(
            _RAW, _RAW_PRIVATE, serialization.NoEncryption()
        )
        self_mask_shares = split_secret(self._self_seed, graph.share_threshold, xs)
        mask_key_shares = split_secret(mask_secret, graph.share_threshold, xs)
        ciphertexts: dict[str, bytes] = {}
        for holder, b_share, s_share in zip(
            holders, self_mask_shares, mask_key_shares, strict=True
        ):
            if holder == self.identity:
                self._held[holder] = (b_share, s_share)
                continue
            key = _share_key(
                self._cipher_private,
                roster[holder].cipher_key,
                self.params.session,
                self.identity,
                holder,
            )
            aad = _associated_data(self.params.session, self.identity, holder)
            ciphertexts[holder] = ChaCha20Poly1305(key).encrypt(
                _ZERO_NONCE, b_share.to_bytes() + s_share.to_bytes(), aad
            )
        self._phase = _ClientPhase.MASK
        return ciphertexts

    def masked_input(
        self, vector: RingVector, ciphertexts: Mapping[str, bytes], contributors: Collection[str]
    ) -> RingVector:
        """y_u for the encoded update `vector`, given the shares addressed to this client by its
        neighbours in U2 and `contributors`, U2 as the coordinator announces it (all of it, also
        beyond this client's neighbourhood: it is part of the view signed in the next step)."""
        self._expect(_ClientPhase.MASK)
        assert self._graph is not None
        _check_vector(vector, self.params)
        announced = frozenset(contributors)
        if self.identity not in announced or not announced <= self._roster.keys():
            raise SecAggError(
                "the clients announced as having shared keys must include this client and be "
                "of the roster"
            )
        if len(announced) < self.params.threshold:
            raise SecAggError(
                f"only {len(announced)} clients shared keys; the threshold is {self.params.threshold}"
            )
        peers = self._graph.neighbours[self.identity] & announced
        if set(ciphertexts) != peers:
            raise SecAggRefused(
                f"the coordinator announced share bundles from {sorted(peers)} but relayed them "
                f"from {sorted(ciphertexts)}"
            )
        # Not counting itself: with fewer peers' masks, fewer peers' keys would strip them.
        needed = self._graph.share_threshold
        if len(peers) < needed:
            group = "of this client's neighbours " if self._graph.sparse else "peers "
            raise SecAggRefused(
                f"only {len(peers)} {group}shared keys; this client masks against at least "
                f"{needed} (the share threshold, not counting itself)"
            )
        received: dict[str, tuple[Share, Share]] = {}
        for sender, ciphertext in ciphertexts.items():
            key = _share_key(
                self._cipher_private,
                self._roster[sender].cipher_key,
                self.params.session,
                sender,
                self.identity,
            )
            aad = _associated_data(self.params.session, sender, self.identity)
            try:
                plain = ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, aad)
            except InvalidTag as exc:
                raise SecAggError(f"the shares from {sender!r} failed authentication") from exc
            if len(plain) != 2 * SHARE_BYTES:
                raise SecAggError(f"the shares from {sender!r} have the wrong length")
            b_share, s_share = (
                Share.from_bytes(plain[:SHARE_BYTES]),
                Share.from_bytes(plain[SHARE_BYTES:]),
            )
            if (
                b_share.x != self._indices[self.identity]
                or s_share.x != self._indices[self.identity]
            ):
                raise SecAggError(f"the shares from {sender!r} are addressed to another index")
            received[sender] = (b_share, s_share)
        self._held.update(received)
        self._contributors = peers | {self.identity}
        self._announced = announced

        masked: RingVector = vector.copy()
        prg.add_keystream(self._self_seed, masked)
        for peer in sorted(peers):
            key = pairwise_mask_key(
                self._mask_private,
                self._roster[peer].mask_key,
                self.params.session,
                self.identity,
                peer,
            )
            prg.add_keystream(key, masked, subtract=peer < self.identity)
        self._phase = _ClientPhase.AGREE
        return masked

    def agree(self, request: UnmaskRequest, setup_digest: bytes) -> bytes:
        """The consistency step: check the survivor set U3 against U2 as announced, and return
        `view_statement` for this client to sign. A client agrees to one survivor set per
        session; `unmask` then answers only that one. Refuses an inconsistent or too small
        survivor set, and survivors that fall apart into groups whose sums could be unmasked
        separately."""
        self._expect(_ClientPhase.AGREE)
        assert self._graph is not None
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggRefused(
                f"the coordinator lists {sorted(survivors & dropped)} as both survived and dropped"
            )
        if self.identity in dropped or self.identity not in survivors:
            raise SecAggRefused(
                f"{self.identity!r} sent its masked input; the coordinator cannot count it as dropped"
            )
        if survivors | dropped != self._announced:
            raise SecAggRefused(
                "the survivors and the dropped must be exactly the clients announced as having "
                f"shared keys ({sorted(self._announced)}), got {sorted(survivors | dropped)}"
            )
        if len(survivors) < self.params.threshold:
            raise SecAggError(
                f"only {len(survivors)} clients survived; the threshold is {self.params.threshold}"
            )
        if not self._graph.connected(survivors):
            raise SecAggRefused(
                "the survivors fall apart into groups no pairwise mask joins, so the sum of each "
                "group could be unmasked on its own"
            )
        self._agreed = UnmaskRequest(tuple(sorted(survivors)), tuple(sorted(dropped)))
        self._phase = _ClientPhase.UNMASK
        return view_statement(
            self.params.session, setup_digest, self._roster, self._announced, survivors
        )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Shares of b_u for the survivors and of s_u for the dropped among the clients whose
        shares this client holds (itself and its neighbours in U2), for the survivor set it
        agreed to only. The caller first checks that every survivor signed the same view
        (client/secure.py). Refuses anything that would reveal both kinds for one peer."""
        self._expect(_ClientPhase.UNMASK)
        assert self._graph is not None and self._agreed is not None
        survivors, dropped = set(request.survivors), set(request.dropped)
        if (survivors, dropped) != (set(self._agreed.survivors), set(self._agreed.dropped)):
            raise SecAggRefused(
                "the unmasking request differs from the survivor set this client signed"
            )
        survivors &= self._contributors
        dropped &= self._contributors
        requests = {peer: ShareKind.SELF_MASK for peer in survivors}
        requests.update({peer: ShareKind.MASK_KEY for peer in dropped})
        self._guard.release(requests)
        return UnmaskResponse(
            self_mask_shares={peer: self._held[peer][0] for peer in sorted(survivors)},
            mask_key_shares={peer: self._held[peer][1] for peer in sorted(dropped)},
        )

    def _expect(self, phase: _ClientPhase) -> None:
        if self._phase != phase:
            raise SecAggError(
                f"secure aggregation step out of order: expected {self._phase.name.lower()}, asked for {phase.name.lower()}"
            )


class _ServerPhase(Enum):
    ADVERTISE = 1
    SHARE = 2
    MASK = 3
    AGREE = 4
    UNMASK = 5
    DONE = 6


class SecAggServer:
    """The coordinator's side of a session: relays keys and shares, sums masked inputs as they
    arrive (memory O(vector), not O(clients x vector)) and removes the masks at the end.

    Each `close_*` call ends a step, e.g. when the round engine's deadline for it passes; from
    then on the clients heard from are the set the next step works with.
    """

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._phase = _ServerPhase.ADVERTISE
        self._keys: dict[str, KeyAdvertisement] = {}
        self._graph: SessionGraph | None = None
        self._outboxes: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> ciphertext
        self._contributors: frozenset[str] = frozenset()
        self._sum: RingVector = np.zeros(params.vector_length, dtype=params.dtype)
        self._masked_from: set[str] = set()
        self._request: UnmaskRequest | None = None
        self._signatures: dict[str, bytes] = {}
        self._responses: dict[str, UnmaskResponse] = {}
        self.corrupt_responders: list[str] = []

    @property
    def graph(self) -> SessionGraph | None:
        """The session's graph, once step 1 has closed."""
        return self._graph

    @property
    def roster(self) -> Mapping[str, KeyAdvertisement]:
        """The advertised keys (U1 once step 1 has closed)."""
        return self._keys

    # Step 1.
    def add_keys(self, identity: str, advertisement: KeyAdvertisement) -> None:
        self._expect(_ServerPhase.ADVERTISE)
        if identity in self._keys:
            raise SecAggError(f"{identity!r} already advertised keys for this session")
        for key in (advertisement.cipher_key, advertisement.mask_key):
            if len(key) != PUBLIC_KEY_BYTES:
                raise SecAggError(
                    f"{identity!r} advertised a public key of {len(key)} bytes, not {PUBLIC_KEY_BYTES}"
                )
        self._keys[identity] = advertisement

    def close_advertisement(self) -> dict[str, KeyAdvertisement]:
        """End step 1; the roster U1 every advertiser receives."""
        self._expect(_ServerPhase.ADVERTISE)
        self._require(len(self._keys), "advertised keys")
        self._graph = SessionGraph.of(self.params, self._keys)
        self._phase = _ServerPhase.SHARE
        return dict(self._keys)

    # Step 2.
    def add_shares(self, sender: str, ciphertexts: Mapping[str, bytes]) -> None:
        self._expect(_ServerPhase.SHARE)
        if sender not in self._keys:
            raise SecAggError(f"{sender!r} is not in this session's roster")
        if sender in self._outboxes:
            raise SecAggError(f"{sender!r} already sent its shares")
        assert self._graph is not None
        if set(ciphertexts) != self._graph.neighbours[sender]:
            others = "neighbour" if self._graph.sparse else "other client"
            raise SecAggError(
                f"{sender!r} must send one encrypted share bundle to every {others} of the roster"
            )
        self._outboxes[sender] = dict(ciphertexts)

    def close_sharing(self) -> None:
        """End step 2: U2 = the clients whose shares arrived."""
        self._expect(_ServerPhase.SHARE)
        self._require(len(self._outboxes), "shared their keys")
        self._contributors = frozenset(self._outboxes)
        self._phase = _ServerPhase.MASK

    @property
    def contributors(self) -> tuple[str, ...]:
        """U2, announced to every client with its share bundles, once step 2 has closed."""
        return tuple(sorted(self._contributors))

    def shares_for(self, recipient: str) -> dict[str, bytes]:
        """The share bundles addressed to `recipient` by its neighbours in U2."""
        self._expect(_ServerPhase.MASK)
        if recipient not in self._contributors:
            raise SecAggError(
                f"{recipient!r} did not share its keys in time and cannot take part further"
            )
        return {
            sender: box[recipient] for sender, box in self._outboxes.items() if recipient in box
        }

    # Step 3.
    def add_masked_input(self, identity: str, masked: RingVector) -> None:
        """Fold one client's masked vector into the running sum (modulo 2^k)."""
        self._expect(_ServerPhase.MASK)
        if identity not in self._contributors:
            raise SecAggError(f"{identity!r} is not among the clients that shared keys")
        if identity in self._masked_from:
            raise SecAggError(f"{identity!r} already sent its masked input")
        _check_vector(masked, self.params)
        np.add(self._sum, masked, out=self._sum)
        self._masked_from.add(identity)

    def close_masked_inputs(self) -> UnmaskRequest:
        """End step 3: the survivor set every survivor signs in step 4 (U3 and U2 minus U3)."""
        self._expect(_ServerPhase.MASK)
        self._require(len(self._masked_from), "sent masked inputs")
        assert self._graph is not None
        if not self._graph.connected(self._masked_from):
            self._phase = _ServerPhase.DONE
            raise SecAggError(
                "the clients that sent masked inputs fall apart into groups no pairwise mask "
                "joins (too many of some clients' neighbours dropped); the survivors refuse to "
                "unmask such a sum"
            )
        self._request = UnmaskRequest(
            survivors=tuple(sorted(self._masked_from)),
            dropped=tuple(sorted(self._contributors - self._masked_from)),
        )
        self._outboxes.clear()
        self._phase = _ServerPhase.AGREE
        return self._request

    def view_statement(self, setup_digest: bytes) -> bytes:
        """What each survivor signs in step 4, as the coordinator's own view has it."""
        assert self._request is not None
        return view_statement(
            self.params.session,
            setup_digest,
            self._keys,
            self._contributors,
            self._request.survivors,
        )

    # Step 4.
    def add_view_signature(self, identity: str, signature: bytes) -> None:
        self._expect(_ServerPhase.AGREE)
        assert self._request is not None
        if identity not in self._request.survivors:
            raise SecAggError(f"{identity!r} is not a survivor of this session")
        if identity in self._signatures:
            raise SecAggError(f"{identity!r} already signed the survivor set")
        self._signatures[identity] = signature

    def close_agreement(self) -> UnmaskRequest:
        """End step 4: the unmasking request with every survivor's signature. Clients unmask
        only a survivor set that all survivors signed, so one that did not sign fails it."""
        self._expect(_ServerPhase.AGREE)
        assert self._request is not None
        missing = sorted(set(self._request.survivors) - self._signatures.keys())
        if missing:
            self._phase = _ServerPhase.DONE
            raise SecAggError(
                f"{missing} sent masked inputs but did not sign the survivor set; clients "
                "unmask only a set every survivor signed, so this sum cannot be recovered"
            )
        self._request = UnmaskRequest(
            self._request.survivors, self._request.dropped, dict(sorted(self._signatures.items()))
        )
        self._phase = _ServerPhase.UNMASK
        return self._request

    # Step 5.
    def add_unmask_response(self, identity: str, response: UnmaskResponse) -> None:
        self._expect(_ServerPhase.UNMASK)
        assert self._request is not None
        if identity not in self._request.survivors:
            raise SecAggError(f"{identity!r} is not a survivor of this session")
        if identity in self._responses:
            raise SecAggError(f"{identity!r} already answered the unmasking request")
        assert self._graph is not None
        held = self._graph.group(identity)
        if set(response.self_mask_shares) != held & set(self._request.survivors) or set(
            response.mask_key_shares
        ) != held & set(self._request.dropped):
            raise SecAggError(f"{identity!r} answered with shares for other clients than requested")
        index = roster_indices(self._keys)[identity]
        shares = [*response.self_mask_shares.values(), *response.mask_key_shares.values()]
        if any(share.x != index for share in shares):
            raise SecAggError(f"{identity!r} sent shares with another client's index")
        self._responses[identity] = response

    def result(self) -> RingVector:
        """The unmasked sum of the survivors' vectors; needs `threshold` unmasking responses,
        and for every secret to rebuild the graph's share threshold t of its holders' shares.

        One survivor answering with corrupted shares is found and left out when every secret
        has at least t + 2 shares (then each is rebuilt, and checked, without it): it is named
        in `corrupt_responders`. More corruption than that fails the round (SecAggError).
        """
        self._expect(_ServerPhase.UNMASK)
        assert self._request is not None
        self._require(len(self._responses), "answered the unmasking request")
        responders = sorted(self._responses)
        try:
            seeds, mask_keys = self._reconstruct(responders)
        except SecAggError:
            culprit = self._single_corrupt_responder(responders)
            if culprit is None:
                self._phase = _ServerPhase.DONE
                raise
            self.corrupt_responders.append(culprit)
            seeds, mask_keys = self._reconstruct([r for r in responders if r != culprit])
        assert self._graph is not None
        total = self._sum
        for seed in seeds:
            prg.add_keystream(seed, total, subtract=True)
        for gone, private in mask_keys.items():
            for survivor in sorted(self._graph.neighbours[gone] & set(self._request.survivors)):
                key = pairwise_mask_key(
                    private, self._keys[survivor].mask_key, self.params.session, gone, survivor
                )
                # The survivor added +PRG(s) when gone > survivor and -PRG(s) otherwise; undo it.
                prg.add_keystream(key, total, subtract=gone > survivor)
        self._phase = _ServerPhase.DONE
        return total

    def _reconstruct(
        self, responders: list[str]
    ) -> tuple[list[bytes], dict[str, X25519PrivateKey]]:
        """The survivors' self-mask seeds and the dropped clients' mask keys from the shares of
        `responders`; SecAggError if the shares are inconsistent or a key does not match."""
        assert self._request is not None and self._graph is not None
        threshold = self._graph.share_threshold
        held_by_kind = {kind: self._held_shares(responders, kind) for kind in ShareKind}

        def rebuild(owner: str, kind: ShareKind) -> bytes:
            shares = [held[owner] for held in held_by_kind[kind] if owner in held]
            try:
                return reconstruct_secret(shares, threshold)
            except SecAggError as exc:
                raise SecAggError(f"the {kind.value} of {owner!r}: {exc}") from None

        seeds = [rebuild(survivor, ShareKind.SELF_MASK) for survivor in self._request.survivors]
        mask_keys: dict[str, X25519PrivateKey] = {}
        for gone in self._request.dropped:
            secret = rebuild(gone, ShareKind.MASK_KEY)
            private = X25519PrivateKey.from_private_bytes(secret)
            if _public_bytes(private) != self._keys[gone].mask_key:
                raise SecAggError(
                    f"the reconstructed mask key of {gone!r} does not match its advertised key"
                )
            mask_keys[gone] = private
        return seeds, mask_keys

    def _held_shares(self, responders: list[str], kind: ShareKind) -> list[dict[str, Share]]:
        """Each responder's shares of one kind, by the client they are of."""
        return [
            self._responses[r].self_mask_shares
            if kind is ShareKind.SELF_MASK
            else self._responses[r].mask_key_shares
            for r in responders
        ]

    def _single_corrupt_responder(self, responders: list[str]) -> str | None:
        """The one responder without whom every secret rebuilds consistently, if there is one
        and, whoever it is, the others are enough (t + 1 shares of every secret) to check it."""
        assert self._request is not None and self._graph is not None
        needed = self._graph.share_threshold + 2
        for kind, owners in (
            (ShareKind.SELF_MASK, self._request.survivors),
            (ShareKind.MASK_KEY, self._request.dropped),
        ):
            held = self._held_shares(responders, kind)
            if any(sum(owner in shares for shares in held) < needed for owner in owners):
                return None
        for suspect in responders:
            try:
                self._reconstruct([r for r in responders if r != suspect])
            except SecAggError:
                continue
            return suspect
        return None

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            self._phase = _ServerPhase.DONE
            raise SecAggError(
                f"only {count} clients {what}; secure aggregation needs at least "
                f"{self.params.threshold}, so this round's sum cannot be recovered"
            )

    def _expect(self, phase: _ServerPhase) -> None:
        if self._phase != phase:
            raise SecAggError(
                f"secure aggregation step out of order: the session is at {self._phase.name.lower()}, not {phase.name.lower()}"
            )
