"""Fine-grained FP8 (E4M3) quantization: DeepSeek-V3 report §3.3.1-§3.3.2.

The report quantizes every GEMM input to E4M3 with scales computed online from
the max-abs of a small tile, so that one outlier only costs precision to the
128 values that share its scale:

* activations: one scale per **1x128** tile (per token, per 128 channels),
  i.e. along the GEMM contraction dim K, so the GEMM can apply it when it
  promotes a 128-wide partial sum (see ``fp8_matmul``);
* weights: one scale per **128x128** block;
* Wgrad contracts over tokens, so there the activations (and output grads) are
  quantized along the token axis instead, in **128x1** tiles (§3.3.2, and the
  "re-tile 1x128 into 128x1" note in §3.3.3).

scale = max(amax, 1e-4) / 448 (448 = E4M3 max; the clamp is in DeepSeek's
``inference/kernel.py::act_quant`` and keeps all-zero tiles finite).  With
``pow2_scale=True`` the scale is rounded *up* to 2**ceil(log2 s) (UE8M0, as in
DeepSeek's later checkpoints and DeepGEMM's SM100 path); rounding up keeps
|x/s| <= 448.  A dimension that is not a multiple of 128 is zero-padded before
the amax, as in DeepSeek's README_WEIGHTS; the quantized values are returned
at the original shape and only the scale tensors have ceil(n/128) entries.

Dequantized value = q.astype(f32) * scale ("scale_inv" in DeepSeek's naming).
All functions are pure jnp: XLA fuses the amax, divide and cast into one pass.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import FP8, FP8_MAX, TILE, cdiv

AMAX_FLOOR = 1e-4    # DeepSeek clamps amax so zero tiles get a finite scale

__all__ = [
    "FP8", "FP8_MAX", "TILE",
    "quantize_act_1x128", "quantize_act_128x1", "quantize_weight_128x128",
    "dequantize_act_1x128", "dequantize_act_128x1", "dequantize_weight_128x128",
]


def _check_float(name: str, x, min_ndim: int, exact_ndim: int | None = None):
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8:
        raise ValueError(f"{name}: expected a float32/bfloat16/float16 array, "
                         f"got dtype {x.dtype} (shape {tuple(x.shape)})")
    if exact_ndim is not None and x.ndim != exact_ndim:
        raise ValueError(f"{name}: expected a {exact_ndim}-D array, got shape "
                         f"{tuple(x.shape)}")
    if x.ndim < min_ndim or 0 in x.shape:
        raise ValueError(f"{name}: expected at least {min_ndim}-D with non-empty "
                         f"dims, got shape {tuple(x.shape)}")
    return x


def _scale_from_amax(amax, pow2_scale: bool):
    s = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
    if pow2_scale:
        # UE8M0: round up so that |x / s| never exceeds 448.
        s = jnp.exp2(jnp.ceil(jnp.log2(s)))
    return s


def _quant_last(x, pow2_scale: bool):
    """Quantize along the last axis in 128-wide groups: (..., K) -> (..., K), (..., ceil(K/128))."""
    k = x.shape[-1]
    kp = cdiv(k, TILE) * TILE
    xf = x.astype(jnp.float32)
    if kp != k:  # zero padding: does not change the amax of the edge tile
        xf = jnp.pad(xf, [(0, 0)] * (x.ndim - 1) + [(0, kp - k)])
    xb = xf.reshape(*x.shape[:-1], kp // TILE, TILE)
    s = _scale_from_amax(jnp.max(jnp.abs(xb), axis=-1), pow2_scale)
    # Clip guards the f32 division rounding amax/(amax/448) to 448.00003 -> NaN.
    q = jnp.clip(xb / s[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q.reshape(*x.shape[:-1], kp)[..., :k], s


def _dequant_last(q, s, out_dtype):
    k = q.shape[-1]
    s_full = jnp.repeat(s, TILE, axis=-1)[..., :k]
    return (q.astype(jnp.float32) * s_full).astype(out_dtype)


def _check_q(name, q, s, expected_s_shape):
    if q.dtype != FP8:
        raise ValueError(f"{name}: expected values of dtype float8_e4m3fn, got "
                         f"{q.dtype} (shape {tuple(q.shape)})")
    if tuple(s.shape) != tuple(expected_s_shape):
        raise ValueError(f"{name}: scales have shape {tuple(s.shape)}, expected "
                         f"{tuple(expected_s_shape)} for values of shape {tuple(q.shape)}")


def quantize_act_1x128(x, *, pow2_scale: bool = False):
    """x (..., K) float -> (q (..., K) e4m3, scales (..., ceil(K/128)) f32).

    One scale per token per 128 channels (Fprop / Dgrad LHS).
    """
    x = _check_float("quantize_act_1x128(x)", x, min_ndim=1)
    return _quant_last(x, pow2_scale)


def dequantize_act_1x128(q, s, out_dtype=jnp.float32):
    """Inverse of ``quantize_act_1x128``: q (..., K), s (..., ceil(K/128)) -> (..., K)."""
    _check_q("dequantize_act_1x128", q, s, (*q.shape[:-1], cdiv(q.shape[-1], TILE)))
    return _dequant_last(q, s, out_dtype)


def quantize_act_128x1(x, *, pow2_scale: bool = False):
    """x (..., T, K) float -> (q (..., T, K) e4m3, scales (..., ceil(T/128), K) f32).

    One scale per channel per 128 tokens: the Wgrad operands (dW = dY^T X
    contracts over tokens, so the scales must run along the token axis).
    """
    x = _check_float("quantize_act_128x1(x)", x, min_ndim=2)
    q, s = _quant_last(jnp.swapaxes(x, -1, -2), pow2_scale)
    return jnp.swapaxes(q, -1, -2), jnp.swapaxes(s, -1, -2)


def dequantize_act_128x1(q, s, out_dtype=jnp.float32):
    """Inverse of ``quantize_act_128x1``: q (..., T, K), s (..., ceil(T/128), K)."""
    if q.ndim < 2:
        raise ValueError(f"dequantize_act_128x1: expected q of shape (..., T, K), "
                         f"got {tuple(q.shape)}")
    _check_q("dequantize_act_128x1", q, s,
             (*q.shape[:-2], cdiv(q.shape[-2], TILE), q.shape[-1]))
    return jnp.swapaxes(_dequant_last(jnp.swapaxes(q, -1, -2),
                                      jnp.swapaxes(s, -1, -2), out_dtype), -1, -2)


def quantize_weight_128x128(w, *, pow2_scale: bool = False):
    """w (N, K) float -> (q (N, K) e4m3, scales (ceil(N/128), ceil(K/128)) f32).

    (N, K) = (out, in) is DeepSeek's checkpoint layout, already K-major.
    """
    w = _check_float("quantize_weight_128x128(w)", w, min_ndim=2, exact_ndim=2)
    n, k = w.shape
    nb, kb = cdiv(n, TILE), cdiv(k, TILE)
    wf = jnp.pad(w.astype(jnp.float32), [(0, nb * TILE - n), (0, kb * TILE - k)])
    blocks = wf.reshape(nb, TILE, kb, TILE)
    s = _scale_from_amax(jnp.max(jnp.abs(blocks), axis=(1, 3)), pow2_scale)
    q = jnp.clip(blocks / s[:, None, :, None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q.reshape(nb * TILE, kb * TILE)[:n, :k], s


def dequantize_weight_128x128(q, s, out_dtype=jnp.float32):
    """Inverse of ``quantize_weight_128x128``: q (N, K), s (ceil(N/128), ceil(K/128))."""
    if q.ndim != 2:
        raise ValueError(f"dequantize_weight_128x128: expected q of shape (N, K), "
                         f"got {tuple(q.shape)}")
    n, k = q.shape
    _check_q("dequantize_weight_128x128", q, s, (cdiv(n, TILE), cdiv(k, TILE)))
    s_full = jnp.repeat(jnp.repeat(s, TILE, axis=0), TILE, axis=1)[:n, :k]
    return (q.astype(jnp.float32) * s_full).astype(out_dtype)

