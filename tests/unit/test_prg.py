"""Tests for the ChaCha20 PRG behind secure-aggregation masks and DP noise."""

from __future__ import annotations

import numpy as np
import pytest

from fedlink.common import prg


def test_keystream_matches_the_rfc_8439_test_vector() -> None:
    # RFC 8439, appendix A.1, test vector 1: all-zero key and nonce, block counter 0.
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert prg.expand(bytes(32), 8, np.uint64).tobytes() == expected


def test_expansion_is_deterministic_per_key_and_a_prefix_across_lengths() -> None:
    key = bytes(range(32))
    long = prg.expand(key, (prg._CHUNK_BYTES // 4) + 1000, np.uint32)  # crosses a chunk boundary
    assert np.array_equal(prg.expand(key, 1000, np.uint32), long[:1000])
    assert np.array_equal(prg.expand(key, long.size, np.uint32), long)
    assert not np.array_equal(prg.expand(bytes(31) + b"\x01", 1000, np.uint32), long[:1000])
    assert np.array_equal(prg.expand(key, 500, np.uint64).view(np.uint32), long[:1000])


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_adding_the_keystream_in_place_equals_adding_the_expanded_mask(dtype: type) -> None:
    key = b"m" * 32
    length = (1 << 18) // np.dtype(dtype).itemsize * 3 + 17  # several slices and a remainder
    start = np.arange(length, dtype=dtype)
    target = start.copy()
    prg.add_keystream(key, target)
    mask = prg.expand(key, length, dtype)
    assert np.array_equal(target, start + mask)  # numpy wraps unsigned sums modulo 2^bits
    prg.add_keystream(key, target, subtract=True)
    assert np.array_equal(target, start)


def test_keystream_bytes_are_uniform() -> None:
    data = prg.expand(b"k" * 32, 1 << 16, np.uint64).view(np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 400  # 255 dof: mean 255, sd 22.6


def test_gaussian_samples_have_the_requested_moments() -> None:
    samples = prg.gaussian(b"g" * 32, 200_001, 3.0)
    assert samples.shape == (200_001,)
    assert abs(samples.mean()) < 0.05  # standard error 3 / sqrt(2e5) = 0.0067
    assert abs(samples.std() - 3.0) < 0.05
    assert abs(np.mean(np.abs(samples) < 3.0) - 0.6827) < 0.01  # one sigma
    assert np.array_equal(samples, prg.gaussian(b"g" * 32, 200_001, 3.0))


def test_bad_keys_and_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(b"short", 4, np.uint64)
    with pytest.raises(ValueError, match="C-contiguous"):
        prg.keystream_into(bytes(32), np.zeros((4, 4), dtype=np.uint64)[:, 0])
    with pytest.raises(ValueError, match="C-contiguous"):
        prg.add_keystream(bytes(32), np.zeros((4, 4), dtype=np.uint64)[:, 0])
    with pytest.raises(ValueError, match="standard deviation"):
        prg.gaussian(bytes(32), 4, float("nan"))
