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
from dsv3_jax.layers import fp8_kernel, fp8_weight, matmul_nt, normal_param
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
        return matmul_nt(x, w, out_dtype=jnp.float32).astype(x.dtype)
    return mm(w1), mm(w3)


def _down(a, b, w2):
    """One tile's SwiGLU and down projection: a, b [M,F], w2 [D,F] -> [M,D]."""
    h = jax.nn.silu(a) * b
    return matmul_nt(h, w2, out_dtype=jnp.float32).astype(h.dtype)


def _tile_rows_of(copy, gates):
    """copy [T,M] (the token copy n K + k in each tile row; N K on padding) -> token [T,M] (N on
    padding: out of range) and gate [T,M] f32 (0 on padding) of each row."""
    K = gates.shape[1]
    return copy // K, gates.reshape(-1).at[copy].get(mode="fill", fill_value=0)


def _tiled_fwd(x, gates, w1, w2, w3, copy, tile_expert, n_used):
    token, gate = _tile_rows_of(copy, gates)
    T, M = copy.shape

    def body(t, carry):
        out, a, b = carry
        e = tile_expert[t]
        a_t, b_t = _up(x.at[token[t]].get(mode="fill", fill_value=0), w1[e], w3[e])
        y = _down(a_t, b_t, w2[e]).astype(jnp.float32) * gate[t][:, None]
        return out.at[token[t]].add(y, mode="drop"), a.at[t].set(a_t), b.at[t].set(b_t)

    zeros = lambda: jnp.zeros((T, M, w1.shape[1]), x.dtype)  # noqa: E731
    out, a, b = jax.lax.fori_loop(0, n_used, body, (jnp.zeros(x.shape, jnp.float32), zeros(), zeros()))
    return out, (x, gates, a, b, w1, w2, w3, copy, tile_expert, n_used)


def _tiled_bwd(res, dout):
    x, gates, a, b, w1, w2, w3, copy, tile_expert, n_used = res
    token, gate = _tile_rows_of(copy, gates)
    f32 = jnp.float32

    def body(t, carry):
        dx, dgate, dw1, dw2, dw3 = carry
        e, tok, g = tile_expert[t], token[t], gate[t][:, None]
        do = dout.at[tok].get(mode="fill", fill_value=0).astype(x.dtype)  # [M,D], before the gate
        h, swiglu_vjp = jax.vjp(lambda a_, b_: jax.nn.silu(a_) * b_, a[t], b[t])
        dh = jnp.einsum("md,df->mf", do, w2[e], preferred_element_type=f32)  # d(row output)/dh, ungated
        dw2_e = jnp.einsum("md,mf->df", (do * g).astype(x.dtype), h, preferred_element_type=f32)
        da, db = swiglu_vjp((dh * g).astype(x.dtype))
        dx_t, dw1_e, dw3_e = jax.vjp(_up, x.at[tok].get(mode="fill", fill_value=0), w1[e], w3[e])[1]((da, db))
        # d gate = <row output, dout> = <h, dout w2>: no need to keep the rows' outputs
        dgate = dgate.at[t].set((h.astype(f32) * dh).sum(-1))
        return (dx.at[tok].add(dx_t, mode="drop"), dgate, dw1.at[e].add(dw1_e),
                dw2.at[e].add(dw2_e.astype(dw2.dtype)), dw3.at[e].add(dw3_e))

    init = (jnp.zeros_like(x), jnp.zeros(copy.shape, f32), *(jnp.zeros_like(w) for w in (w1, w2, w3)))
    dx, dgate, dw1, dw2, dw3 = jax.lax.fori_loop(0, n_used, body, init)
    N, K = gates.shape
    dgates = jnp.zeros((N * K,), f32).at[copy.reshape(-1)].set(dgate.reshape(-1), mode="drop")
    return dx, dgates.reshape(N, K).astype(gates.dtype), dw1, dw2, dw3, None, None, None


@jax.custom_vjp
def tiled_swiglu(x, gates, w1, w2, w3, copy, tile_expert, n_used):
    """The routed SwiGLU in the tile-padded layout, gathered, gated and combined: x [N,D], gates
    [N,K] f32, w1/w3 [E,F,D], w2 [E,D,F], copy [T,M] the token copy (n K + k) in each row of each
    tile (N K: padding), tile_expert [T] -> sum_k gates[:,k] * expert_{ids[:,k]}(x) [N,D] f32.

    A loop over the n_used used tiles, each gathering its M token rows, running three [M,D]x[D,F]-
    sized GEMMs on its expert's weights in place and adding its gated rows into the output. The
    custom VJP is what makes it fast on XLA:CPU: the loop has a data-dependent trip count (no work
    for the worst-case layout's spare tiles); each tile adds its weight gradient into its expert's
    slot instead of materializing [T,F,D] per-tile gradients (as a batched GEMM over gathered
    weights does); and the backward keeps only the pre-activations a, b [T,M,F] with x and the
    gates. The tiles' inputs are gathered again from x and the gates' gradient comes from h and
    dout w2, which the backward computes anyway, so neither the [T,M,D] tile inputs nor the
    [N,K,D] expert outputs are kept: under the layer scan each residual is a zero-filled [L,...]
    stack written and read back every step.
    """
    return _tiled_fwd(x, gates, w1, w2, w3, copy, tile_expert, n_used)[0]


tiled_swiglu.defvjp(_tiled_fwd, _tiled_bwd)


def tile_rows(n_copies: int, n_experts: int, most: int = 64) -> int:
    """The tile height for n_copies token copies over n_experts: the mean rows per expert rounded up
    to a power of two, at most `most`. Padding then stays under one tile per expert, and a decode
    step (a few copies, fewer than the experts) gets tiles of one row: its loop reads only the
    activated experts' weights, where a grouped GEMM or the dense reference reads all E."""
    mean = -(-n_copies // n_experts)
    return min(most, 1 << (mean - 1).bit_length())


def rows_cover_experts(n_rows: int, k: int, n_experts: int, most_rows: int = 16) -> bool:
    """Whether a few rows read (nearly) every expert anyway, so that every expert on every row (the
    dense form) is the cheaper way to run them: at least two copies per expert on average (under
    uniform routing 1 - e^-2 = 86% of the experts are read) and at most `most_rows` rows.

    Why: the dense form reads each expert's weights once, in three large products, where the tile
    loop slices an expert per tile (XLA:CPU copies each slice) and pays a loop iteration per tile;
    at batch 8 of a 16-expert top-4 model it is 1.5-1.8x faster (`bench/moe_decode.py`). Its E/K
    times the useful FLOPs is 2 N FLOPs per weight element, so with N <= 16 it stays under the
    weights' read time on CPUs and accelerators alike. Training and prefill batches have more rows
    and keep the tiles; a real model's decode batch (N K << 2 E) keeps the copy loop."""
    return n_rows <= most_rows and n_rows * k >= 2 * n_experts


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
    form on XLA:CPU. Shapes as routed_experts. tile: rows per tile (default `tile_rows`, or the
    dense form where `rows_cover_experts`)."""
    N, K = ids.shape
    if tile is None and rows_cover_experts(N, K, w1.shape[0]):
        return dense_reference(x, gates, ids, w1, w2, w3, dtype=dtype).astype(jnp.float32)
    tile = tile_rows(N * K, w1.shape[0]) if tile is None else tile
    if tile == 1:
        return copy_loop_experts(x, gates, ids, w1, w2, w3, dtype=dtype)
    slot, tile_expert, n_used = tile_layout(ids, w1.shape[0], tile)
    n_tiles = tile_expert.shape[0]
    copy = jnp.full((n_tiles * tile,), N * K, jnp.int32).at[slot].set(jnp.arange(N * K, dtype=jnp.int32),
                                                                       mode="drop")
    return tiled_swiglu(x.astype(dtype), gates, w1.astype(dtype), w2.astype(dtype), w3.astype(dtype),
                        copy.reshape(n_tiles, tile), tile_expert, n_used)


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
    x [N,D], gates/ids [N,K] -> [N,D] in `dtype`. Also the tiled form's choice for a few rows that
    read every expert anyway (`rows_cover_experts`)."""
    E = w1.shape[0]
    combine = jnp.einsum("nk,nke->ne", gates, jax.nn.one_hot(ids, E, dtype=gates.dtype))
    x = x.astype(dtype)
    # Weights on the left, contracting their stored minor axis: written "nd,efd->nef", XLA:CPU
    # copies each weight into a transposed layout first (2x slower at decode sizes).
    h = jax.nn.silu(jnp.einsum("efd,nd->efn", w1.astype(dtype), x)) * jnp.einsum("efd,nd->efn", w3.astype(dtype), x)
    y = jnp.einsum("edf,efn->edn", w2.astype(dtype), h)
    return jnp.einsum("edn,ne->nd", y.astype(jnp.float32), combine).astype(dtype)
