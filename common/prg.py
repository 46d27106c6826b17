"""Cryptographic pseudo-random vectors: a ChaCha20 keystream viewed as unsigned integers.

Secure aggregation's masks and the Gaussian noise of differential privacy both need long random
vectors that an adversary cannot predict. Both come from here: a full 32-byte key expanded with
ChaCha20 (OpenSSL through `cryptography`) straight into a numpy buffer, with no Python loop per
element, so expansion runs at several GB/s on one core. (Flower's secure aggregation seeds a
non-cryptographic generator with 32 bits; a 32-bit seed can be brute-forced from one masked vector.)
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from numpy.typing import NDArray

KEY_BYTES = 32
# cryptography's ChaCha20 takes a 16-byte nonce whose first 4 bytes are the block counter: one key
# yields at most 2**32 blocks of 64 bytes before the counter would wrap.
MAX_STREAM_BYTES = (1 << 32) * 64
_ZERO_NONCE = bytes(16)
# Keystream is produced by encrypting zeros; a fixed-size block of them is reused for every call.
_CHUNK_BYTES = 1 << 22
_ZEROS = bytes(_CHUNK_BYTES)
# Masks are added a slice at a time, while the slice of keystream is still in the CPU's cache.
_MASK_CHUNK_BYTES = 1 << 18

UIntArray = NDArray[np.unsignedinteger]


def keystream_into(key: bytes, out: NDArray[np.generic]) -> None:
    """Fill `out` (a C-contiguous array of any dtype) with the ChaCha20 keystream of `key`.

    Each key must be used for one purpose only: callers derive a fresh key per round, pair of
    clients and purpose (the nonce is fixed at zero because the key never repeats).
    """
    encryptor = _encryptor(key, out)
    view = out.reshape(-1).view(np.uint8).data
    for start in range(0, out.nbytes, _CHUNK_BYTES):
        stop = min(start + _CHUNK_BYTES, out.nbytes)
        encryptor.update_into(_ZEROS[: stop - start], view[start:stop])


def add_keystream(key: bytes, target: UIntArray, *, subtract: bool = False) -> None:
    """target += (or -=) the keystream of `key` viewed as target's dtype, modulo 2**bits.

    Equals adding `expand(key, target.size, target.dtype)` without materialising it: the
    stream is produced and added slice by slice, so the work stays in cache and the vector is
    read and written once.
    """
    encryptor = _encryptor(key, target)
    flat = target.reshape(-1)
    per_chunk = max(1, _MASK_CHUNK_BYTES // flat.itemsize)
    scratch = np.empty(min(per_chunk, flat.size), dtype=flat.dtype)
    raw = scratch.view(np.uint8).data
    operation = np.subtract if subtract else np.add
    for start in range(0, flat.size, per_chunk):
        part = flat[start : start + per_chunk]
        encryptor.update_into(_ZEROS[: part.nbytes], raw[: part.nbytes])
        operation(part, scratch[: part.size], out=part)


def _encryptor(key: bytes, out: NDArray[np.generic]) -> CipherContext:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a PRG key is {KEY_BYTES} bytes, got {len(key)}")
    if not out.flags.c_contiguous:
        raise ValueError("the PRG output array must be C-contiguous")
    if out.nbytes > MAX_STREAM_BYTES:
        raise ValueError(
            f"a PRG stream is at most {MAX_STREAM_BYTES} bytes, asked for {out.nbytes}"
        )
    return Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()


def expand(key: bytes, length: int, dtype: np.dtype[np.unsignedinteger] | type) -> UIntArray:
    """`length` uniformly random unsigned integers of `dtype` (little-endian) from a 32-byte key."""
    out = np.empty(length, dtype=np.dtype(dtype).newbyteorder("<"))
    keystream_into(key, out)
    return out


def gaussian(key: bytes, length: int, std: float) -> NDArray[np.float64]:
    """`length` independent N(0, std**2) samples drawn from the keystream of `key` (Box-Muller).

    Uniforms come from 53-bit slices of the keystream, so the noise is as unpredictable as the key.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"the standard deviation must be finite and >= 0, got {std}")
    pairs = (length + 1) // 2
    raw = expand(key, 2 * pairs, np.uint64)
    # (0, 1]: 53 random bits, offset by one so log() never sees zero.
    uniforms = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))
    u1, u2 = uniforms[:pairs], uniforms[pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = (2.0 * math.pi) * u2
    samples = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:length]
    samples *= std
    return samples
