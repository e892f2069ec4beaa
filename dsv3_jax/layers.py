"""Leaf layers: Linear, RMSNorm, Embedding, the SwiGLU MLP. They take plain ints, not the config.

Shape letters: B batch, S sequence, D `dim`, F MLP width, V vocabulary.

Weights are stored (out, in) as in DeepSeek's and HF's checkpoints. That is the K-major layout
Hopper's FP8 tensor cores need, and it makes checkpoint conversion a rename. Every parameter
carries `logical_axes` metadata; `sharding.py` maps those names onto the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dtype_of(name: str):
    return jnp.dtype(name)


def normal_param(rngs: nnx.Rngs, shape, std: float, dtype, axes: tuple[str, ...]) -> nnx.Param:
    assert len(axes) == len(shape), (shape, axes)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def linear(x: jax.Array, weight: jax.Array, *, dtype, impl: str = "default") -> jax.Array:
    """y = x @ weight.T with weight (N, K). The one seam through which every projection goes."""
    if impl != "default":
        raise ValueError(f"linear impl={impl!r}: expected 'default'")
    return jnp.einsum("...k,nk->...n", x.astype(dtype), weight.astype(dtype))


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *, std: float,
                 dtype: str, param_dtype: str, rngs: nnx.Rngs):
        self.weight = normal_param(rngs, (out_features, in_features), std, param_dtype, axes)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.weight[...], dtype=self.dtype)


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
                 rngs: nnx.Rngs):
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1 = Linear(dim, hidden, ("mlp", "embed"), **kw)
        self.w2 = Linear(hidden, dim, ("embed", "mlp"), **kw)
        self.w3 = Linear(dim, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))
