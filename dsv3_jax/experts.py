"""The routed experts: their stacked SwiGLU weights and the dropless grouped compute over them.

Shape letters (the package legend): N token rows, D `dim`, E experts (all of them, or the ones
on this device under expert parallelism), F `moe_inter_dim`, K expert slots per row.

Written once and used by both paths: `moe.py` runs all E experts on the local tokens, and
`parallel/ep.py` runs a shard's experts on the tokens the all-to-all brought in. Either way the
rows' token copies are sorted by expert and go through one grouped GEMM per weight matrix:
`jax.lax.ragged_dot` ("default") or the FP8 grouped GEMMs ("fp8"). "tiled", the fast form on
XLA:CPU, lays the copies out in whole tiles of one expert each and runs the SwiGLU a tile at a time
(`tiled_routed_experts`). `dense_reference` computes every expert on every token and is what the
tests compare the dropless paths against.
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
    GEMMs; a `scale` [E, out/128, in/128] means w is stored in e4m3 (FP8 inference; `pow2_scale`:
    power-of-two activation scales). Rows past sum(group_sizes) belong to no expert and come out as zeros.
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
    # ragged_dot wants (E, in, out)
    return jax.lax.ragged_dot(a.astype(dtype), jnp.swapaxes(w, 1, 2).astype(dtype), group_sizes,
                              preferred_element_type=jnp.float32).astype(dtype)


def tile_layout(ids, n_experts: int, tile: int):
    """Where each token copy goes in the tile-padded layout (DeepGEMM's "contiguous layout"): the
    copies sorted by expert, each expert's rows padded to whole tiles, so a tile holds one expert.

    ids [N,K] (n_experts: an empty slot) -> slot [N*K] row of each copy (n_tiles * tile for an empty
    slot: out of range), tile_expert [n_tiles], n_used (tiles that hold rows; the rest are spare).
    n_tiles is the static worst case ceil((N K + E (tile - 1)) / tile).
    """
    flat = ids.reshape(-1)
    NK, E = flat.shape[0], n_experts
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # empty slots (id E) not counted
    padded = (group_sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    padded_start, start = padded_end - padded, jnp.cumsum(group_sizes) - group_sizes
    n_tiles = -(-(NK + E * (tile - 1)) // tile)
    order = jnp.argsort(flat, stable=True)
    expert = jnp.minimum(flat[order], E - 1)
    row = jnp.where(flat[order] < E, padded_start[expert] + jnp.arange(NK) - start[expert], n_tiles * tile)
    slot = jnp.zeros((NK,), jnp.int32).at[order].set(row)
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right"), E - 1)
    return slot, tile_expert, padded_end[-1] // tile


def _up(x, w1, w3):
    """One tile's gate and up projections: x [M,D], w1/w3 [F,D] -> [M,F], [M,F]."""
    def mm(w):
        return jnp.einsum("md,fd->mf", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return mm(w1), mm(w3)


def _down(a, b, w2):
    """One tile's SwiGLU and down projection: a, b [M,F], w2 [D,F] -> [M,D]."""
    h = jax.nn.silu(a) * b
    return jnp.einsum("mf,df->md", h, w2, preferred_element_type=jnp.float32).astype(h.dtype)


def _tiled_swiglu_fwd(buf, w1, w2, w3, tile_expert, n_used):
    T, M, _ = buf.shape

    def body(t, carry):
        y, a, b = carry
        e = tile_expert[t]
        a_t, b_t = _up(buf[t], w1[e], w3[e])
        return y.at[t].set(_down(a_t, b_t, w2[e])), a.at[t].set(a_t), b.at[t].set(b_t)

    zeros = lambda n: jnp.zeros((T, M, n), buf.dtype)  # noqa: E731
    y, a, b = jax.lax.fori_loop(0, n_used, body, (zeros(w2.shape[1]), zeros(w1.shape[1]), zeros(w1.shape[1])))
    return y, (buf, a, b, w1, w2, w3, tile_expert, n_used)


def _tiled_swiglu_bwd(res, dy):
    buf, a, b, w1, w2, w3, tile_expert, n_used = res

    def body(t, carry):
        dbuf, dw1, dw2, dw3 = carry
        e = tile_expert[t]
        da, db, dw2_e = jax.vjp(_down, a[t], b[t], w2[e])[1](dy[t])
        dx, dw1_e, dw3_e = jax.vjp(_up, buf[t], w1[e], w3[e])[1]((da, db))
        return dbuf.at[t].set(dx), dw1.at[e].add(dw1_e), dw2.at[e].add(dw2_e), dw3.at[e].add(dw3_e)

    grads = jax.lax.fori_loop(0, n_used, body, tuple(jnp.zeros_like(v) for v in (buf, w1, w2, w3)))
    return (*grads, None, None)


@jax.custom_vjp
def tiled_swiglu(buf, w1, w2, w3, tile_expert, n_used):
    """The routed SwiGLU on tile-padded rows: tile t of buf [T,M,D] through expert tile_expert[t]'s
    w1/w3 [E,F,D] and w2 [E,D,F] -> [T,M,D]; the n_used..T-1 spare tiles come out as zeros.

    A loop over the used tiles, each three [M,D]x[D,F]-sized GEMMs on its expert's weights in place.
    The custom VJP is what makes it fast on XLA:CPU: the loop has a data-dependent trip count (no
    work for the worst-case layout's spare tiles), the backward keeps only the tiles' inputs and
    pre-activations (a batched GEMM over gathered weights keeps a [T,F,D] copy of each weight per
    layer), and each tile adds its weight gradient into its expert's slot instead of materializing
    [T,F,D] per-tile gradients.
    """
    return _tiled_swiglu_fwd(buf, w1, w2, w3, tile_expert, n_used)[0]


tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)


def tile_rows(n_copies: int, n_experts: int, most: int = 64) -> int:
    """The tile height for n_copies token copies over n_experts: the mean rows per expert rounded up
    to a power of two, at most `most`. Padding then stays under one tile per expert, and a decode
    step (a few copies, fewer than the experts) gets tiles of one row: its loop reads only the
    activated experts' weights, where a grouped GEMM or the dense reference reads all E."""
    mean = -(-n_copies // n_experts)
    return min(most, 1 << (mean - 1).bit_length())


def copy_loop_experts(x, gates, ids, w1, w2, w3, *, dtype):
    """The tiled form with tiles of one row: each token copy is its own tile, so there is no layout
    to build (no sort, no gathers). A loop over the N K copies, each reading its expert's weights
    in place and adding its gated output to its token's row; shapes as routed_experts. For a
    decode step, where N K < E: the step reads K experts per token, not all E. Empty slots
    (id E) read expert E-1 and add nothing (their gate is 0)."""
    N, K = ids.shape
    E = w1.shape[0]
    x = x.astype(dtype)

    def body(c, y):
        n, k = c // K, c % K
        e = jnp.minimum(ids[n, k], E - 1)
        a, b = _up(x[n][None], w1[e].astype(dtype), w3[e].astype(dtype))
        out = _down(a, b, w2[e].astype(dtype))[0]
        return y.at[n].add(jnp.where(ids[n, k] < E, gates[n, k], 0.0) * out.astype(jnp.float32))

    return jax.lax.fori_loop(0, N * K, body, jnp.zeros((N, x.shape[1]), jnp.float32))


def tiled_routed_experts(x, gates, ids, w1, w2, w3, *, dtype, tile: int | None = None):
    """routed_experts in the tile-padded layout (`tile_layout`, `tiled_swiglu`): the fast dropless
    form on XLA:CPU. One gather puts each token copy in its expert's tiles and one gathers the
    results back; shapes as routed_experts. tile: rows per tile (default `tile_rows`)."""
    N, K = ids.shape
    D = x.shape[1]
    tile = tile_rows(N * K, w1.shape[0]) if tile is None else tile
    if tile == 1:
        return copy_loop_experts(x, gates, ids, w1, w2, w3, dtype=dtype)
    slot, tile_expert, n_used = tile_layout(ids, w1.shape[0], tile)
    n_tiles = tile_expert.shape[0]
    token = jnp.full((n_tiles * tile,), N, jnp.int32).at[slot].set(jnp.arange(N * K, dtype=jnp.int32) // K,
                                                                    mode="drop")
    buf = x.astype(dtype).at[token].get(mode="fill", fill_value=0).reshape(n_tiles, tile, D)
    y = tiled_swiglu(buf, w1.astype(dtype), w2.astype(dtype), w3.astype(dtype), tile_expert, n_used)
    y = y.reshape(n_tiles * tile, D).at[slot].get(mode="fill", fill_value=0).reshape(N, K, D)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), gates)


def routed_experts(x, gates, ids, w1, w2, w3, *, dtype, impl: str = "default", scales=(None,) * 3,
                   pow2_scale: bool = False):
    """Dropless SwiGLU experts. x [N,D], gates [N,K] f32, ids [N,K] expert of each slot (E: the
    slot is empty), w1/w3 [E,F,D], w2 [E,D,F] -> sum_k gates[:,k] * expert_{ids[:,k]}(x) [N,D] f32.

    The N K token copies are sorted by expert (empty slots last, in no group, so they compute
    zeros), run through the grouped GEMMs, and scattered back to their slots. impl "tiled" (with
    high-precision weights) is `tiled_routed_experts`.
    """
    if impl == "tiled" and scales[0] is None:
        return tiled_routed_experts(x, gates, ids, w1, w2, w3, dtype=dtype)
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
    # Weights on the left, contracting their stored minor axis: written "nd,efd->nef", XLA:CPU
    # copies each weight into a transposed layout first (2x slower at decode sizes).
    h = jax.nn.silu(jnp.einsum("efd,nd->efn", w1.astype(dtype), x)) * jnp.einsum("efd,nd->efn", w3.astype(dtype), x)
    y = jnp.einsum("edf,efn->edn", w2.astype(dtype), h)
    return jnp.einsum("edn,ne->nd", y.astype(jnp.float32), combine).astype(dtype)
