"""Shamir secret sharing (t of n) of 32-byte secrets over the prime field GF(2**521 - 1).

A secret is the constant term of a random polynomial of degree t - 1; share i is the polynomial
at x = i. Any t shares determine the secret by Lagrange interpolation and t - 1 shares reveal
nothing about it. The Mersenne prime 2**521 - 1 is far larger than any 32-byte secret, so a
secret never has to be split into pieces.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fedlink.common.errors import SecAggError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
MAX_SHARES = (1 << 16) - 1
_Y_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SHARE_BYTES = 2 + _Y_BYTES


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x is the holder's index in the roster (>= 1)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise SecAggError(f"a secret share is {SHARE_BYTES} bytes, got {len(data)}")
        share = cls(int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))
        _check_point(share)
        return share


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Share `secret` among holders at `xs` (distinct, 1..65535) so that any `threshold` of them
    can reconstruct it and fewer learn nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or not all(1 <= x <= MAX_SHARES for x in xs):
        raise ValueError("share indices must be distinct integers in 1..65535")
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"threshold must be in 1..{len(xs)} (the number of shares), got {threshold}"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def reconstruct_secret(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret behind `shares`; refuses fewer than `threshold` shares or inconsistent ones.

    With more than `threshold` shares, two different subsets of size `threshold` must agree: a
    corrupted share changes the interpolation of every subset it is in differently, so it is
    detected unless every share is corrupted consistently.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise SecAggError(
            f"cannot reconstruct a secret from {len(shares)} shares: the threshold is {threshold}"
        )
    for share in shares:
        _check_point(share)
    if len({share.x for share in shares}) != len(shares):
        raise SecAggError("two shares have the same index; each holder contributes one share")
    ordered = sorted(shares, key=lambda share: share.x)
    value = _interpolate_at_zero(ordered[:threshold])
    if len(ordered) > threshold and _interpolate_at_zero(ordered[-threshold:]) != value:
        raise SecAggError("the secret shares are inconsistent: at least one was corrupted")
    if value >= 1 << (8 * SECRET_BYTES):
        raise SecAggError(
            "the reconstructed value is not a 32-byte secret: the shares were corrupted"
        )
    return value.to_bytes(SECRET_BYTES, "big")


def _check_point(share: Share) -> None:
    if not 1 <= share.x <= MAX_SHARES:
        raise SecAggError(f"share index {share.x} is outside 1..{MAX_SHARES}")
    if not 0 <= share.y < PRIME:
        raise SecAggError("share value is outside the field")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate_at_zero(points: Sequence[Share]) -> int:
    # Lagrange: f(0) = sum_i y_i * prod_{j != i} x_j / (x_j - x_i).
    weights = _lagrange_weights_at_zero(tuple(point.x for point in points))
    return sum(point.y * weight for point, weight in zip(points, weights, strict=True)) % PRIME


@functools.lru_cache(maxsize=64)
def _lagrange_weights_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights depend only on the holders' indices, which are the same for every secret a
    set of holders rebuilds: computed once per set (quadratic work and one inversion each), then
    each secret costs one dot product."""
    weights = []
    for i, x_i in enumerate(xs):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if i != j:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)
