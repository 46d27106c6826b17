"""Tests for Shamir secret sharing: any t shares reconstruct, fewer are refused, corruption is caught."""

from __future__ import annotations

import itertools
import secrets

import pytest

from fedlink.common.errors import SecAggError
from fedlink.common.shamir import PRIME, SHARE_BYTES, Share, reconstruct_secret, split_secret


def test_every_subset_of_threshold_shares_reconstructs_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        assert reconstruct_secret(list(subset), 3) == secret
    assert reconstruct_secret(shares, 3) == secret  # more than t: checked for consistency


def test_shares_use_the_given_indices_and_are_random_each_time() -> None:
    secret = bytes(range(32))
    first, second = split_secret(secret, 2, [3, 9]), split_secret(secret, 2, [3, 9])
    assert [s.x for s in first] == [3, 9]
    assert first != second  # fresh random coefficients
    assert reconstruct_secret(first, 2) == reconstruct_secret(second, 2) == secret


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = split_secret(secrets.token_bytes(32), 4, list(range(1, 8)))
    with pytest.raises(SecAggError, match="from 3 shares: the threshold is 4"):
        reconstruct_secret(shares[:3], 4)


def test_a_corrupted_share_is_detected_when_more_than_threshold_shares_are_given() -> None:
    shares = split_secret(secrets.token_bytes(32), 3, [1, 2, 3, 4, 5])
    for position in range(5):
        corrupted = list(shares)
        corrupted[position] = Share(shares[position].x, (shares[position].y + 1) % PRIME)
        with pytest.raises(SecAggError, match="corrupted"):
            reconstruct_secret(corrupted, 3)


def test_duplicate_and_out_of_range_shares_are_refused() -> None:
    shares = split_secret(secrets.token_bytes(32), 2, [1, 2, 3])
    with pytest.raises(SecAggError, match="same index"):
        reconstruct_secret([shares[0], shares[0]], 2)
    with pytest.raises(SecAggError, match="outside the field"):
        reconstruct_secret([shares[0], Share(2, PRIME)], 2)
    with pytest.raises(SecAggError, match="index 0"):
        reconstruct_secret([shares[0], Share(0, 5)], 2)


def test_shares_round_trip_through_bytes() -> None:
    share = split_secret(secrets.token_bytes(32), 2, [65535, 1])[0]
    data = share.to_bytes()
    assert len(data) == SHARE_BYTES == 68
    assert Share.from_bytes(data) == share
    with pytest.raises(SecAggError, match="68 bytes"):
        Share.from_bytes(data[:-1])


def test_bad_split_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        split_secret(b"short", 2, [1, 2])
    with pytest.raises(ValueError, match="distinct"):
        split_secret(bytes(32), 2, [1, 1])
    with pytest.raises(ValueError, match=r"threshold must be in 1\.\.2"):
        split_secret(bytes(32), 3, [1, 2])
