"""Wire formats for the expert-parallel all-to-all: what a [..., D] activation becomes on the network.

  fp32, bf16   plain casts (fp32 is the exact mode the equivalence tests use).
  fp8          E4M3 with one power-of-two scale per 1x128 tile (V3 report §3.3 / Appendix B: the
               activation before the MoE up-projection is quantized before dispatch, with pow2
               scales so that re-quantization on the far side is exact).
  logfmtN      LogFMT-nBit (ISCA '25 "Insights" §3.2). Per 1x128 tile: take ln|x| of the non-zero
               elements, min and max of those; the top bit is the sign, the other n-1 bits a code
               K in 0..2^(n-1)-1 where 0 is exact zero, 1 is exp(min) and 2^(n-1)-1 is exp(max), in
               equal log steps of (max - min) / (2^(n-1) - 2). min is clamped to > max - ln(2^32)
               (an E5-like range). Rounding picks the nearer of the two neighbouring levels in
               *linear* space (the paper's point: rounding in log space would bias the values
               upward). Decode: sign * exp(min + step * (K - 1)).

`encode` returns a tuple of arrays (the payload the all-to-all moves); `decode` inverts it;
`wire_bytes` counts the payload bytes, and `packed_bytes` what a bit-packed LogFMT-n would move
(codes of 10 bits travel in a uint16 here).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from pallas_kernels import TILE, dequantize_act_1x128, quantize_act_1x128
from dsv3_jax.errors import ConfigError

LOG_RANGE = 32 * math.log(2.0)  # max - min <= ln(2^32)


def logfmt_bits(fmt: str) -> int | None:
    """'logfmt8' -> 8; any other format -> None."""
    m = re.fullmatch(r"logfmt(\d+)", fmt)
    return int(m.group(1)) if m else None


def check_format(fmt: str) -> None:
    bits = logfmt_bits(fmt)
    if fmt not in ("fp32", "bf16", "fp8") and not (bits is not None and 3 <= bits <= 16):
        raise ConfigError(f"wire format {fmt!r}: expected 'fp32', 'bf16', 'fp8' or 'logfmtN' with 3 <= N <= 16")


def _tiles(x):
    """(..., K) -> f32 (..., K/128, 128), zero-padded."""
    k = x.shape[-1]
    kp = -(-k // TILE) * TILE
    xf = x.astype(jnp.float32)
    if kp != k:
        xf = jnp.pad(xf, [(0, 0)] * (x.ndim - 1) + [(0, kp - k)])
    return xf.reshape(*x.shape[:-1], kp // TILE, TILE)


def logfmt_encode(x: jax.Array, n_bits: int):
    """x (..., K) -> codes (..., K) uint8/uint16, lo (..., K/128) f32, step (..., K/128) f32."""
    xb = _tiles(x)
    a = jnp.abs(xb)
    nz = a > 0
    la = jnp.log(jnp.where(nz, a, 1.0))
    hi = jnp.max(jnp.where(nz, la, -jnp.inf), axis=-1)
    lo = jnp.min(jnp.where(nz, la, jnp.inf), axis=-1)
    empty = ~jnp.isfinite(hi)  # an all-zero tile
    hi, lo = jnp.where(empty, 0.0, hi), jnp.where(empty, 0.0, lo)
    lo = jnp.maximum(lo, hi - LOG_RANGE)
    levels = 2 ** (n_bits - 1) - 1  # codes 1..levels carry magnitudes
    step = (hi - lo) / (levels - 1)
    safe = jnp.where(step > 0, step, 1.0)[..., None]
    k_lo = jnp.clip(jnp.floor((la - lo[..., None]) / safe), 0, levels - 2)
    v_lo = jnp.exp(lo[..., None] + step[..., None] * k_lo)
    v_hi = jnp.exp(lo[..., None] + step[..., None] * (k_lo + 1))
    code = jnp.where(a - v_lo > v_hi - a, k_lo + 2, k_lo + 1)  # nearest level, in linear space
    below = la < lo[..., None]  # only when the 2^32 range clamp raised min: zero or exp(min)
    code = jnp.where(below, jnp.where(a < 0.5 * jnp.exp(lo)[..., None], 0, 1), code)
    code = jnp.where(nz, code, 0).astype(jnp.int32) | ((xb < 0).astype(jnp.int32) << (n_bits - 1))
    dt = jnp.uint8 if n_bits <= 8 else jnp.uint16
    codes = code.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]].astype(dt)
    return codes, lo, step


def logfmt_decode(codes, lo, step, n_bits: int, dtype=jnp.float32):
    """Inverse of `logfmt_encode`: codes (..., K), lo/step (..., K/128) -> (..., K)."""
    c = codes.astype(jnp.int32)
    mag = c & (2 ** (n_bits - 1) - 1)
    sign = 1.0 - 2.0 * (c >> (n_bits - 1)).astype(jnp.float32)
    k = codes.shape[-1]
    lo_f = jnp.repeat(lo, TILE, axis=-1)[..., :k]
    st_f = jnp.repeat(step, TILE, axis=-1)[..., :k]
    v = jnp.where(mag == 0, 0.0, jnp.exp(lo_f + st_f * (mag - 1).astype(jnp.float32)))
    return (sign * v).astype(dtype)


def encode(x: jax.Array, fmt: str) -> tuple[jax.Array, ...]:
    if fmt == "fp32":
        return (x.astype(jnp.float32),)
    if fmt == "bf16":
        return (x.astype(jnp.bfloat16),)
    if fmt == "fp8":
        return quantize_act_1x128(x, pow2_scale=True)
    bits = logfmt_bits(fmt)
    if bits is None:
        check_format(fmt)
    return logfmt_encode(x, bits)


def decode(payload: tuple[jax.Array, ...], fmt: str, dtype) -> jax.Array:
    if fmt in ("fp32", "bf16"):
        return payload[0].astype(dtype)
    if fmt == "fp8":
        return dequantize_act_1x128(*payload, out_dtype=dtype)
    return logfmt_decode(*payload, logfmt_bits(fmt), dtype)


def roundtrip(x: jax.Array, fmt: str) -> jax.Array:
    return decode(encode(x, fmt), fmt, x.dtype)


def wire_bytes(shape, fmt: str) -> int:
    """Bytes of the payload `encode` produces for an array of `shape` (as this code sends it)."""
    payload = jax.eval_shape(lambda: encode(jnp.zeros(shape, jnp.float32), fmt))
    return sum(math.prod(p.shape) * p.dtype.itemsize for p in payload)


def packed_bytes(shape, fmt: str) -> float:
    """Bytes a bit-packed encoding would move: n/8 per LogFMT-n code plus its two f32 per tile."""
    bits = logfmt_bits(fmt)
    if bits is None:
        return float(wire_bytes(shape, fmt))
    n = math.prod(shape)
    tiles = math.prod(shape[:-1]) * -(-shape[-1] // TILE)
    return n * bits / 8 + tiles * 8
