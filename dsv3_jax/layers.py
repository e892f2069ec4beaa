"""Leaf layers: Linear, RMSNorm, Embedding, the SwiGLU MLP. They take plain ints, not the config.

Shape letters (the package legend): B batch, S sequence, D `dim`, F MLP width, V vocabulary.

Weights are stored (out, in) as in DeepSeek's and HF's checkpoints. That is the K-major layout
Hopper's FP8 tensor cores need, and it makes checkpoint conversion a rename. Every parameter
carries `logical_axes` metadata; `sharding.py` maps those names onto the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import fp8_block_matmul, fp8_linear, quantize_act_1x128
from dsv3_jax.errors import ConfigError


def dtype_of(name: str):
    return jnp.dtype(name)


def normal_param(rngs: nnx.Rngs, shape, std: float, dtype, axes: tuple[str, ...]) -> nnx.Param:
    assert len(axes) == len(shape), (shape, axes)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class Fp8Scale(nnx.Variable):
    """weight_scale_inv of an e4m3 weight: one float32 per 128x128 block (DeepSeek's FP8 checkpoints)."""


def fp8_kernel(impl: str) -> str:
    """"fp8" -> "auto", "fp8:reference" -> "reference"."""
    return impl.partition(":")[2] or "auto"


# XLA:CPU runs a product of a few rows with a weight through a GEMM (YNNPACK) that costs 2-3x its
# one-row matrix-vector product although it reads the same weight (bench/small_m_matmul.py). An MTP
# verification (2 rows per sequence) and decode-sized expert tiles are such products. One
# matrix-vector product per row costs 1.5x one row at 2 rows and breaks even with the GEMM at 4,
# so on CPU up to SMALL_ROWS rows take that form; other backends and row counts take the einsum.
SMALL_ROWS = 3


def matmul_nt(x: jax.Array, w: jax.Array, *, out_dtype=None) -> jax.Array:
    """x [..., K] @ w[N, K].T -> [..., N]; out_dtype as an einsum's preferred_element_type."""
    out_dtype = out_dtype or jnp.result_type(x, w)
    rows = x.size // x.shape[-1]
    if 1 < rows <= SMALL_ROWS and jax.default_backend() == "cpu":
        x2 = x.reshape(rows, x.shape[-1])
        y = jnp.stack([jnp.einsum("k,nk->n", x2[i], w, preferred_element_type=out_dtype) for i in range(rows)])
        return y.reshape(*x.shape[:-1], w.shape[0])
    return jnp.einsum("...k,nk->...n", x, w, preferred_element_type=out_dtype)


def linear(x: jax.Array, weight: jax.Array, *, dtype, impl: str = "default", scale=None,
           pow2_scale: bool = False) -> jax.Array:
    """y = x @ weight.T with weight (N, K). The one seam through which every projection goes.

    impl "default": a plain matmul in `dtype`. impl "fp8" (or "fp8:<kernel>" to name the GEMM
    kernel, see ModelConfig.fp8_kernel): DeepSeek's FP8 training GEMMs (1x128 activation tiles,
    128x128 weight blocks, FP32 promotion; custom VJP with FP8 Dgrad and Wgrad). A `scale` means the weight is stored in e4m3 and goes straight to the block-scaled
    matmul, activations quantized on the fly (FP8 inference).
    """
    if scale is not None:
        xq, xs = quantize_act_1x128(x.astype(dtype), pow2_scale=pow2_scale)
        return fp8_block_matmul(xq, xs, weight, scale, out_dtype=jnp.float32).astype(dtype)
    if impl.startswith("fp8"):
        return fp8_linear(x.astype(dtype), weight.astype(dtype), fp8_kernel(impl))
    if impl != "default":
        raise ConfigError(f"linear impl={impl!r}: expected 'default', 'fp8' or 'fp8:<kernel>'")
    return matmul_nt(x.astype(dtype), weight.astype(dtype))


def fp8_weight(shape, axes: tuple[str, ...]) -> tuple[nnx.Param, Fp8Scale]:
    """Zero e4m3 storage for a weight (..., N, K) and its block scales (..., N/128, K/128), filled
    by the checkpoint loader."""
    *lead, n, k = shape
    scale_shape = (*lead, -(-n // 128), -(-k // 128))
    return (nnx.Param(jnp.zeros(shape, jnp.float8_e4m3fn), logical_axes=axes),
            Fp8Scale(jnp.ones(scale_shape, jnp.float32), logical_axes=axes))


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *, std: float,
                 dtype: str, param_dtype: str, rngs: nnx.Rngs, impl: str = "default",
                 fp8_weights: bool = False, pow2_act_scale: bool = False):
        if fp8_weights:
            self.weight, self.weight_scale_inv = fp8_weight((out_features, in_features), axes)
        else:
            self.weight = normal_param(rngs, (out_features, in_features), std, param_dtype, axes)
        self.dtype = jnp.dtype(dtype)
        self.impl = impl
        self.fp8_weights = fp8_weights
        self.pow2_act_scale = pow2_act_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight_scale_inv[...] if self.fp8_weights else None
        return linear(x, self.weight[...], dtype=self.dtype, impl=self.impl, scale=scale,
                      pow2_scale=self.pow2_act_scale)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, axis: str, *, eps: float, param_dtype: str):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32.astype(x.dtype) * self.weight[...]).astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, std: float, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs):
        self.weight = normal_param(rngs, (vocab, dim), std, param_dtype, ("vocab", "embed"))
        self.dtype = jnp.dtype(dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, S] -> [B, S, D]
        return jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype)


class MLP(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). The dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int, *, std: float, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs, impl: str = "default", fp8_weights: bool = False, pow2_act_scale: bool = False):
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs, impl=impl, fp8_weights=fp8_weights,
                  pow2_act_scale=pow2_act_scale)
        self.w1 = Linear(dim, hidden, ("mlp", "embed"), **kw)
        self.w2 = Linear(hidden, dim, ("embed", "mlp"), **kw)
        self.w3 = Linear(dim, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))
