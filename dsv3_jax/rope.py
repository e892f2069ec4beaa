"""Rotary embedding with YaRN, applied to the decoupled RoPE part of MLA only (V3 report §2.1.1, §4.3).

DeepSeek rotates *interleaved* pairs: elements (2i, 2i+1) form one complex number. The released
weights assume this layout (HF's modeling code permutes q_pe/k_pe to reach the same result).

YaRN (factor s, beta_fast, beta_slow over the original context): frequencies whose wavelength is
short compared with the original context are kept (extrapolated), long ones are divided by s
(interpolated), with a linear ramp between the correction dims. The attention temperature
sqrt(t) = 0.1 ln s + 1 enters the softmax scale (config.softmax_scale); when `mscale` and
`mscale_all_dim` differ, their ratio also scales cos/sin, as in HF's implementation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_len: int) -> float:
    """The rotary dim whose wavelength fits `num_rotations` times into `max_len` tokens."""
    return dim * math.log(max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
    dim = cfg.qk_rope_head_dim
    low = math.floor(_correction_dim(cfg.beta_fast, dim, cfg.rope_theta, cfg.original_seq_len))
    high = math.ceil(_correction_dim(cfg.beta_slow, dim, cfg.rope_theta, cfg.original_seq_len))
    return max(low, 0), min(high, dim - 1)


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[R/2] inverse frequencies in float64, YaRN-corrected when rope_factor > 1."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.rope_factor <= 1.0:
        return freqs
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: extrapolate (high frequency), 0: interpolate (low frequency)
    return freqs / cfg.rope_factor * (1.0 - keep) + freqs * keep


def cos_sin_scale(cfg: ModelConfig) -> float:
    """1 for DeepSeek's own configs (mscale == mscale_all_dim); HF's rule otherwise."""
    if cfg.rope_factor <= 1.0:
        return 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return yarn_mscale(cfg.rope_factor)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [..., S] (int) -> cos, sin [..., S, R/2] in float32."""
    inv = jnp.asarray(inv_frequencies(cfg), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv
    scale = cos_sin_scale(cfg)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, R] rotated by cos/sin [B or 1, S, R/2], interleaved pairs, computed in float32."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = x32[..., 0], x32[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
