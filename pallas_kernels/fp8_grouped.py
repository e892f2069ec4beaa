"""Grouped (MoE) FP8 GEMM with fine-grained scales: DeepSeek-V3 report §3.3, §2.1.2.

DeepSeekMoE runs one small GEMM per routed expert.  Tokens arrive sorted
contiguously by expert (``group_sizes[e]`` rows for expert e, in order), every
expert's weight is quantized in 128x128 blocks and every token row in 1x128
tiles, and each expert's GEMM promotes to FP32 every 128 of K exactly like the
dense ``fp8_block_matmul``:

    out[r] = sum_kb dot(xq[r, kb], wq[e(r), :, kb]^T) * xs[r, kb] * ws_col[e(r), kb]

Shapes: xq (M, K) e4m3, xs (M, ceil(K/128)) f32, wq (E, N, K) e4m3,
ws (E, ceil(N/128), ceil(K/128)) f32, group_sizes (E,) int.  Rows past
sum(group_sizes) produce zeros (``lax.ragged_dot``'s convention).

The kernel uses DeepGEMM's "contiguous layout": every group is padded to a
multiple of block_m so that each M tile belongs to exactly one expert, and a
scalar-prefetched tile -> expert table steers the weight BlockSpecs.  This is a
``PrefetchScalarGridSpec`` (TPU-style) ``pl.pallas_call``; on CPU it runs with
``interpret=True``.  A Mosaic GPU version would reuse the same table with the
wgmma kernel of ``fp8_matmul_mgpu`` (not written yet; on GPU "auto" uses the
reference, i.e. ``lax.ragged_dot`` per K block).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import cdiv, pad_to
from pallas_kernels.fp8_matmul import _k_loop_kernel, _promoted_sum
from pallas_kernels.fp8_quant import (FP8, TILE, dequantize_act_128x1, quantize_act_1x128,
                                      quantize_act_128x1, quantize_weight_128x128)


@dataclasses.dataclass(frozen=True)
class Fp8GroupedTuning:
    """Output tile (block_m, block_n); every group is padded to a multiple of block_m."""
    block_m: int = 128
    block_n: int = 128

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Fp8GroupedTuning.{name} must be a positive int, got {v!r}")


def _validate(xq, xs, wq, ws, group_sizes):
    if xq.dtype != FP8 or wq.dtype != FP8:
        raise ValueError(f"fp8_grouped_matmul: xq and wq must be float8_e4m3fn, got "
                         f"xq {xq.dtype}{tuple(xq.shape)}, wq {wq.dtype}{tuple(wq.shape)}")
    if xq.ndim != 2 or wq.ndim != 3 or wq.shape[2] != xq.shape[1]:
        raise ValueError(f"fp8_grouped_matmul: expected xq (M, K) and wq (E, N, K), got "
                         f"xq {tuple(xq.shape)}, wq {tuple(wq.shape)}")
    (m, k), (e, n, _) = xq.shape, wq.shape
    nk = cdiv(k, TILE)
    if xs.dtype != jnp.float32 or tuple(xs.shape) != (m, nk):
        raise ValueError(f"fp8_grouped_matmul: xs must be float32 of shape {(m, nk)}, "
                         f"got {xs.dtype}{tuple(xs.shape)}")
    want = (e, cdiv(n, TILE), nk)
    if ws.dtype != jnp.float32 or tuple(ws.shape) != want:
        raise ValueError(f"fp8_grouped_matmul: ws must be float32 of shape {want}, got "
                         f"{ws.dtype}{tuple(ws.shape)}")
    if tuple(group_sizes.shape) != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"fp8_grouped_matmul: group_sizes must be an integer array of "
                         f"shape {(e,)}, got {group_sizes.dtype}{tuple(group_sizes.shape)}")
    return m, n, k, e, nk


def _weight_scale_cols(ws, n):
    """(E, ceil(N/128), nk) -> (E, nk, N): one scale per expert, K block, output column."""
    return jnp.repeat(ws, TILE, axis=1)[:, :n].transpose(0, 2, 1)


def _row_expert(group_sizes, m):
    """(M,) expert id of every sorted row; rows past the last group get E-1."""
    e = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    return jnp.minimum(jnp.searchsorted(ends, jnp.arange(m), side="right"), e - 1)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _reference(xq, xs, wq, ws, group_sizes, out_dtype):
    (m, k), (e, n, _), nk = xq.shape, wq.shape, xs.shape[1]
    gs = group_sizes.astype(jnp.int32)
    # e4m3 -> bf16 is exact, and so are bf16 products in f32: exact per-block dots.
    xp, wp = pad_to(xq, (m, nk * TILE)), pad_to(wq, (e, n, nk * TILE))
    ws_rows_all = _weight_scale_cols(ws, n)          # (E, nk, N)
    eid = _row_expert(gs, m)

    def part(kb):
        xk = lax.dynamic_slice_in_dim(xp, kb * TILE, TILE, axis=1).astype(jnp.bfloat16)   # (M,128)
        wk = lax.dynamic_slice_in_dim(wp, kb * TILE, TILE, axis=2).astype(jnp.bfloat16)   # (E,N,128)
        dot = lax.ragged_dot(xk, wk.transpose(0, 2, 1), gs, preferred_element_type=jnp.float32)
        return dot * xs[:, kb][:, None] * ws_rows_all[:, kb][eid]

    return _promoted_sum(part, nk).astype(out_dtype)


def fp8_grouped_matmul_reference(xq, xs, wq, ws, group_sizes, out_dtype=jnp.float32):
    """Pure jnp: per K block, ``lax.ragged_dot`` of exact fp8 values, then the row
    scales times a per-row gather of the expert's column scales.  -> (M, N)."""
    _validate(xq, xs, wq, ws, group_sizes)
    return _reference(xq, xs, wq, ws, group_sizes, jnp.dtype(out_dtype))


def _aligned_layout(group_sizes, m, bm, mp):
    """DeepGEMM contiguous layout: pad each group to a multiple of bm.

    Returns dest (M,) padded row of every sorted row (mp = dropped, for rows past
    the groups) and tile_expert (mp // bm,) int32.
    """
    e = group_sizes.shape[0]
    gs = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(gs) - gs
    padded = cdiv(gs, bm) * bm
    pstarts = jnp.cumsum(padded) - padded
    eid = _row_expert(gs, m)
    rows = jnp.arange(m)
    dest = jnp.where(rows < jnp.sum(gs), rows - starts[eid] + pstarts[eid], mp)
    tile_starts = jnp.arange(mp // bm) * bm
    tile_expert = jnp.searchsorted(jnp.cumsum(padded), tile_starts, side="right")
    return dest, jnp.minimum(tile_expert, e - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "out_dtype", "interpret"))
def _pallas(xq, xs, wq, ws, group_sizes, *, bm, bn, out_dtype, interpret):
    (m, k), (e, n, _), nk = xq.shape, wq.shape, xs.shape[1]
    kp, np_ = nk * TILE, cdiv(n, bn) * bn
    # Static capacity: sum_e ceil(g_e/bm)*bm <= M + E*(bm-1), rounded to tiles.
    mp = cdiv(m + e * (bm - 1), bm) * bm
    dest, tile_expert = _aligned_layout(group_sizes, m, bm, mp)
    x_p = jnp.zeros((mp, kp), FP8).at[dest].set(pad_to(xq, (m, kp)), mode="drop")
    xs_p = jnp.zeros((mp, nk), jnp.float32).at[dest].set(xs, mode="drop")
    w_p = pad_to(wq, (e, np_, kp))
    ws_p = pad_to(_weight_scale_cols(ws, n), (e, nk, np_))

    def kernel(te_ref, *refs):  # the tile -> expert table is only used by index maps
        del te_ref
        _k_loop_kernel(*refs)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j, te: (i, 0)),
                  pl.BlockSpec((bm, nk), lambda i, j, te: (i, 0)),
                  pl.BlockSpec((None, bn, kp), lambda i, j, te: (te[i], j, 0)),
                  pl.BlockSpec((None, nk, bn), lambda i, j, te: (te[i], 0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, te: (i, j)))
    out_p = pl.pallas_call(kernel, grid_spec=grid_spec,
                           out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
                           interpret=interpret)(tile_expert, x_p, xs_p, w_p, ws_p)
    out = out_p.at[dest, :n].get(mode="fill", fill_value=0)
    return out.astype(out_dtype)


def fp8_grouped_matmul(xq, xs, wq, ws, group_sizes, out_dtype=jnp.float32, *,
                       impl: str = "auto", interpret=None,
                       tuning: Fp8GroupedTuning | None = None):
    """Grouped FP8 GEMM over expert-sorted rows -> (M, N); shapes as in the module doc.

    impl: "auto" (pallas on TPU, reference elsewhere), "reference" or "pallas";
    ``interpret`` None = interpret unless on TPU.
    """
    if impl not in ("auto", "reference", "pallas"):
        raise ValueError(f"fp8_grouped_matmul: impl must be 'auto', 'reference' or "
                         f"'pallas', got {impl!r}")
    _validate(xq, xs, wq, ws, group_sizes)
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "tpu" else "reference"
    if impl == "reference":
        return fp8_grouped_matmul_reference(xq, xs, wq, ws, group_sizes, out_dtype)
    t = tuning or Fp8GroupedTuning()
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    return _pallas(xq, xs, wq, ws, group_sizes, bm=t.block_m, bn=t.block_n,
                   out_dtype=jnp.dtype(out_dtype), interpret=interpret)


# ---- training: custom VJP, as fp8_linear does for the dense GEMMs -------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_linear(x, w, group_sizes, impl: str = "auto"):
    """y (M, N) = x (M, K) @ w[e(r)] (E, N, K)^T per expert-sorted row, in FP8 (report §3.3).

    Fprop: x in 1x128 tiles, each expert's w in 128x128 blocks. Dgrad: dY in 1x128 tiles times
    w's blocks transposed. Wgrad: dY and X re-quantized along tokens (128x1 tiles) and contracted
    per expert with an exact FP32 sum (the token tiles may straddle two experts: only the scales
    are shared, the sums are not). Output in x.dtype; dw in w.dtype.
    """
    return _fgl_fwd(x, w, group_sizes, impl)[0]


def _quant_w(w):
    return jax.vmap(quantize_weight_128x128)(w)


def _fgl_fwd(x, w, group_sizes, impl):
    xq, xs = quantize_act_1x128(x)
    wq, ws = _quant_w(w)
    y = fp8_grouped_matmul(xq, xs, wq, ws, group_sizes, jnp.float32, impl=impl).astype(x.dtype)
    # Wgrad's X is kept already quantized along tokens (128x1 tiles) in FP8, not as x: the
    # backward used only this quantization of it, so the values are the same at about half the
    # bytes (report §3.3 caches the Linear inputs in FP8 for the backward; fp8_linear does too).
    xt_q, xt_s = quantize_act_128x1(x)
    return y, (xt_q, xt_s, wq, ws, group_sizes, jnp.zeros((0,), w.dtype))


# dW[e] (N, K) = dY_e^T X_e: the token axis (0 of both operands) is contracted group by group.
_WGRAD_DIMS = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _fgl_bwd(impl, res, dy):
    xt_q, xt_s, wq, ws, group_sizes, w_dtype = res
    dyq, dys = quantize_act_1x128(dy)
    # dX = dY W: the "weight" operand is W^T per expert (E, K, N), its block grid transposed.
    dx = fp8_grouped_matmul(dyq, dys, wq.transpose(0, 2, 1), ws.transpose(0, 2, 1), group_sizes,
                            jnp.float32, impl=impl).astype(dy.dtype)
    xt = dequantize_act_128x1(xt_q, xt_s, jnp.float32)
    dyt = dequantize_act_128x1(*quantize_act_128x1(dy), jnp.float32)
    # Wgrad on the FP8-rounded operands, as one ragged-contracting product: it derives from the
    # residuals, so inside a shard_map it varies over the same mesh axes as w (the cotangent of a
    # ragged_dot taken against fresh zeros did not, and failed the custom_vjp's type check).
    dw = lax.ragged_dot_general(dyt, xt, group_sizes, _WGRAD_DIMS, preferred_element_type=jnp.float32)
    return dx, dw.astype(w_dtype.dtype), None


fp8_grouped_linear.defvjp(_fgl_fwd, _fgl_bwd)
