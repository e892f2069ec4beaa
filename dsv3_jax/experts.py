"""The routed experts: their stacked SwiGLU weights and the dropless grouped compute over them.

Shape letters (the package legend): N token rows, D `dim`, E experts (all of them, or the ones
on this device under expert parallelism), F `moe_inter_dim`, K expert slots per row.

Written once and used by both paths: `moe.py` runs all E experts on the local tokens, and
`parallel/ep.py` runs a shard's experts on the tokens the all-to-all brought in. Either way the
rows' token copies are sorted by expert and go through one grouped GEMM per weight matrix:
`jax.lax.ragged_dot` ("default"), the FP8 grouped GEMMs ("fp8"), or tile-padded batched GEMMs
("tiled", the fast form on XLA:CPU). `dense_reference` computes every expert on every token and is
what the tests compare the dropless paths against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import fp8_kernel, fp8_weight, normal_param
from dsv3_jax.vma import vary_like
from pallas_kernels import fp8_grouped_linear, fp8_grouped_matmul, quantize_act_1x128


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights stacked along E, stored (E, out, in)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, F, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
        shapes = {"w1": ((E, F, D), ("exp", "mlp", "embed")), "w2": ((E, D, F), ("exp", "embed", "mlp")),
                  "w3": ((E, F, D), ("exp", "mlp", "embed"))}
        for name, (shape, axes) in shapes.items():
            if cfg.fp8_weights:
                weight, scale = fp8_weight(shape, axes)
                setattr(self, name, weight)
                setattr(self, name + "_scale_inv", scale)
            else:
                setattr(self, name, normal_param(rngs, shape, cfg.init_std, cfg.param_dtype, axes))
        self.fp8_weights = cfg.fp8_weights

    def weights(self):
        return tuple(getattr(self, n)[...] for n in ("w1", "w2", "w3"))

    def scales(self):
        if not self.fp8_weights:
            return (None, None, None)
        return tuple(getattr(self, n + "_scale_inv")[...] for n in ("w1", "w2", "w3"))


def grouped_matmul(a, w, group_sizes, *, dtype, impl: str = "default", scale=None, pow2_scale: bool = False):
    """Expert-sorted rows a [N, in] times their expert's w [E, out, in] -> [N, out].

    The MoE twin of layers.linear: "default" is lax.ragged_dot in `dtype`; "fp8" the FP8 training
    GEMMs; "tiled" the tile-padded batched GEMM; a `scale` [E, out/128, in/128] means w is stored in
    e4m3 (FP8 inference; `pow2_scale`: power-of-two activation scales). Rows past sum(group_sizes) belong to no expert and come out as zeros.
    """
    if scale is not None:
        aq, as_ = quantize_act_1x128(a.astype(dtype), pow2_scale=pow2_scale)
        return fp8_grouped_matmul(aq, as_, w, scale, group_sizes, jnp.float32).astype(dtype)
    if impl.startswith("fp8"):  # no grouped Mosaic GPU kernel yet: "mosaic_gpu" means "auto" here
        kernel = fp8_kernel(impl)
        # Inside a shard_map the rows may vary over mesh axes the weight does not (EP: tokens split
        # over `data`, experts replicated over it). The custom VJP computes dW from the rows, so
        # the weight enters varying like them; the transpose of that cast sums dW over those
        # axes, as it does for a plain matmul.
        w = vary_like(w, a)
        return fp8_grouped_linear(a.astype(dtype), w.astype(dtype), group_sizes,
                                  "auto" if kernel == "mosaic_gpu" else kernel)
    if impl == "tiled":
        return tiled_grouped_matmul(a.astype(dtype), w.astype(dtype), group_sizes)
    # ragged_dot wants (E, in, out)
    return jax.lax.ragged_dot(a.astype(dtype), jnp.swapaxes(w, 1, 2).astype(dtype), group_sizes,
                              preferred_element_type=jnp.float32).astype(dtype)


def tiled_grouped_matmul(a, w, group_sizes, tile: int = 64):
    """grouped_matmul as one batched dense GEMM: each expert's rows are padded to whole tiles
    (DeepGEMM's "contiguous layout") and every tile multiplies its expert's weight.

    XLA:CPU runs lax.ragged_dot as a masked loop over groups; this form does the same FLOPs plus at
    most E*(tile-1) padding rows, in one batched matmul. Shapes are static: the tile count is the
    worst case ceil((N + E*(tile-1)) / tile). a [N, in] sorted by expert, w [E, out, in] -> [N, out].
    """
    N, E = a.shape[0], w.shape[0]
    padded = (group_sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    padded_start, start = padded_end - padded, jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=N)
    n_tiles = -(-(N + E * (tile - 1)) // tile)
    # rows past sum(group_sizes) belong to no expert: they go nowhere and come back as zeros
    dest = jnp.where(jnp.arange(N) < start[-1] + group_sizes[-1],
                     padded_start[expert_of_row] + jnp.arange(N) - start[expert_of_row], n_tiles * tile)
    buf = jnp.zeros((n_tiles * tile, a.shape[1]), a.dtype).at[dest].set(a, mode="drop")
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right"), E - 1)
    y = jnp.einsum("tmi,toi->tmo", buf.reshape(n_tiles, tile, -1), w[tile_expert],
                   preferred_element_type=jnp.float32).astype(a.dtype)
    return y.reshape(n_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)


def routed_experts(x, gates, ids, w1, w2, w3, *, dtype, impl: str = "default", scales=(None,) * 3,
                   pow2_scale: bool = False):
    """Dropless SwiGLU experts. x [N,D], gates [N,K] f32, ids [N,K] expert of each slot (E: the
    slot is empty), w1/w3 [E,F,D], w2 [E,D,F] -> sum_k gates[:,k] * expert_{ids[:,k]}(x) [N,D] f32.

    The N K token copies are sorted by expert (empty slots last, in no group, so they compute
    zeros), run through the grouped GEMMs, and scattered back to their slots.
    """
    N, K = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # token copies grouped by expert
    group_sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)

    def mm(a, w, s):
        return grouped_matmul(a, w, group_sizes, dtype=dtype, impl=impl, scale=s, pow2_scale=pow2_scale)

    xs = x[order // K]
    h = jax.nn.silu(mm(xs, w1, scales[0])) * mm(xs, w3, scales[2])
    y_sorted = mm(h, w2, scales[1])
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(N, K, -1)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), gates)


def dense_reference(x, gates, ids, w1, w2, w3, *, dtype):
    """Reference: every expert on every token, combined with the gate weights (zero if unchosen).
    x [N,D], gates/ids [N,K] -> [N,D] in `dtype`."""
    E = w1.shape[0]
    combine = jnp.einsum("nk,nke->ne", gates, jax.nn.one_hot(ids, E, dtype=gates.dtype))
    x = x.astype(dtype)
    h = jax.nn.silu(jnp.einsum("nd,efd->nef", x, w1.astype(dtype))) * jnp.einsum("nd,efd->nef", x, w3.astype(dtype))
    y = jnp.einsum("nef,edf->ned", h, w2.astype(dtype))
    return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), combine).astype(dtype)
