"""What every FP8 kernel file shares: the format, the tile width, and shape arithmetic."""

from __future__ import annotations

import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0      # largest finite E4M3 (e4m3fn) value
TILE = 128           # N_C in the report: the quantization width (1x128, 128x128) and the promotion interval along K


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


def pad_to(a, shape):
    """Zero-pad `a` at the end of every dimension up to `shape`."""
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])
