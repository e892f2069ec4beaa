"""FP8 GEMM with fine-grained scales and FP32 promotion: DeepSeek-V3 report §3.3.

out (M, N) = x @ w.T where x = xq * xs (1x128 tiles: one scale per row per 128
of K) and w = wq * ws (128x128 blocks), computed in the *split-K* form the
report prescribes (§3.3.2 "Increasing accumulation precision"): every 128-wide
K block is one exact-product dot accumulated in FP32, multiplied by the outer
product of its row and column scales, and summed into an FP32 accumulator:

    out = sum_kb  dot(xq[:, kb], wq[:, kb]^T) * xs[:, kb, None] * ws_col[kb][None, :]

Weights are stored (N, K) = (out, in), DeepSeek's checkpoint layout (K-major,
as Hopper's fp8 wgmma needs).  ``ws`` may be (ceil(N/128), ceil(K/128)) block
scales or (N, ceil(K/128)) per-row scales; the latter is what Wgrad needs,
where both operands are quantized along tokens (see ``fp8_quant``).

Implementations behind ``fp8_block_matmul(..., impl=)``:
  "reference"  pure jnp scan over K blocks (CPU default; any backend)
  "pallas"     backend-neutral ``pl.pallas_call``: variant "k_loop" (a K loop
               inside the kernel, the DeepSeek ``inference/kernel.py`` scheme)
               or "k_grid" (TPU style: K is the last grid axis, an f32 VMEM
               accumulator initialised under ``pl.when(k == 0)``); both run
               with ``interpret=True`` on CPU (TPU default)
  "mosaic_gpu" the Hopper wgmma kernel in ``fp8_matmul_mgpu`` (GPU default;
               GPU interpret mode on CPU)
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import cdiv, pad_to
from pallas_kernels import fp8_matmul_mgpu as _mgpu
from pallas_kernels.fp8_quant import (FP8, TILE, quantize_act_1x128, quantize_act_128x1,
                                      quantize_weight_128x128)

IMPLS = ("auto", "reference", "pallas", "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class Fp8MatmulTuning:
    """Tile sizes; K is always tiled by 128 (the scale and promotion width).

    block_m, block_n: output tile (mosaic "ws" ignores block_m: block_n is each consumer
    warpgroup's width, the CTA tile 128 x block_n, or 64 x 2 block_n for M <= 64).
    max_concurrent_steps: TMA pipeline depth (mosaic_gpu; None: 4 for "ws", 2 for
    "simple", the best points of the H100 sweep in docs/BENCHMARKS.md).
    pallas_variant: "k_loop" | "k_grid" | "auto" (k_grid on TPU).
    mosaic_variant: "ws" (warp-specialized, persistent) | "simple" (one warpgroup per
    output tile) | "auto" (ws).
    """
    block_m: int = 128
    block_n: int = 128
    max_concurrent_steps: int | None = None
    pallas_variant: str = "auto"
    mosaic_variant: str = "auto"

    def __post_init__(self):
        for name in ("block_m", "block_n", "max_concurrent_steps"):
            v = getattr(self, name)
            if name == "max_concurrent_steps" and v is None:
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Fp8MatmulTuning.{name} must be a positive int, got {v!r}")
        if self.pallas_variant not in ("auto", "k_loop", "k_grid"):
            raise ValueError("Fp8MatmulTuning.pallas_variant must be 'auto', 'k_loop' or "
                             f"'k_grid', got {self.pallas_variant!r}")
        if self.mosaic_variant not in ("auto", "ws", "simple"):
            raise ValueError("Fp8MatmulTuning.mosaic_variant must be 'auto', 'ws' or "
                             f"'simple', got {self.mosaic_variant!r}")


def _validate(xq, xs, wq, ws):
    """Checks dtypes/shapes; returns (lead_shape, M, N, K, nk)."""
    if xq.dtype != FP8 or wq.dtype != FP8:
        raise ValueError(f"fp8_block_matmul: xq and wq must be float8_e4m3fn, got "
                         f"xq {xq.dtype}{tuple(xq.shape)}, wq {wq.dtype}{tuple(wq.shape)}")
    if xq.ndim < 1 or wq.ndim != 2:
        raise ValueError(f"fp8_block_matmul: expected xq (..., K) and wq (N, K), got "
                         f"xq {tuple(xq.shape)}, wq {tuple(wq.shape)}")
    *lead, k = xq.shape
    n = wq.shape[0]
    nk = cdiv(k, TILE)
    if wq.shape[1] != k:
        raise ValueError(f"fp8_block_matmul: wq shape {tuple(wq.shape)} does not match "
                         f"xq shape {tuple(xq.shape)}: expected wq of shape (N, {k})")
    if xs.dtype != jnp.float32 or tuple(xs.shape) != (*lead, nk):
        raise ValueError(f"fp8_block_matmul: xs must be float32 of shape {(*lead, nk)} "
                         f"(one scale per row per 128 of K), got {xs.dtype}{tuple(xs.shape)}")
    if ws.dtype != jnp.float32 or tuple(ws.shape) not in ((cdiv(n, TILE), nk), (n, nk)):
        raise ValueError(f"fp8_block_matmul: ws must be float32 of shape "
                         f"{(cdiv(n, TILE), nk)} (128x128 blocks) or {(n, nk)} (per row), "
                         f"got {ws.dtype}{tuple(ws.shape)}")
    return tuple(lead), math.prod(lead), n, k, nk


def _weight_scale_cols(ws, n):
    """(ceil(N/128), nk) block or (N, nk) row scales -> (nk, N) one per output column."""
    if ws.shape[0] != n:
        ws = jnp.repeat(ws, TILE, axis=0)[:n]
    return ws.T


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _reference(x2, xs2, wq, ws, out_dtype):
    (m, k), n, nk = x2.shape, wq.shape[0], xs2.shape[1]
    # e4m3 values are exact in bf16, and bf16 x bf16 products are exact in f32,
    # so each 128-block dot is exact products + f32 sums on every backend.
    xp, wp, ws_cols = pad_to(x2, (m, nk * TILE)), pad_to(wq, (n, nk * TILE)), _weight_scale_cols(ws, n)

    def part(kb):
        xk = lax.dynamic_slice_in_dim(xp, kb * TILE, TILE, axis=1).astype(jnp.bfloat16)
        wk = lax.dynamic_slice_in_dim(wp, kb * TILE, TILE, axis=1).astype(jnp.bfloat16)
        dot = lax.dot_general(xk, wk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return dot * xs2[:, kb][:, None] * ws_cols[kb][None, :]

    return _promoted_sum(part, nk).astype(out_dtype)


def _promoted_sum(part, nk: int):
    """sum over K blocks kb of part(kb), in FP32, one block at a time (the promotion). Each block
    is sliced and widened inside the loop, so no bf16 copy of a whole operand is ever live (the
    dry runs compile this path for FP8-stored 671B weights). The first block starts the sum
    rather than zeros: inside a shard_map the scan carry must vary over the same mesh axes as the
    products (a zeros literal varies over none)."""
    acc, _ = lax.scan(lambda acc, kb: (acc + part(kb), None), part(0), jnp.arange(1, nk))
    return acc


def fp8_block_matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32):
    """Pure-jnp split-K reference.  xq (..., K) e4m3, xs (..., ceil(K/128)) f32,
    wq (N, K) e4m3, ws (ceil(N/128), ceil(K/128)) or (N, ceil(K/128)) f32 -> (..., N)."""
    lead, m, n, k, nk = _validate(xq, xs, wq, ws)
    out = _reference(xq.reshape(m, k), xs.reshape(m, nk), wq, ws, jnp.dtype(out_dtype))
    return out.reshape(*lead, n)


# ----------------------------------------------------------------------------
# Backend-neutral Pallas kernels.  Operands arrive padded: M % bm == N % bn == 0,
# K = nk * 128; weight scales arrive as per-column rows (nk, N).

def _k_loop_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref):
    """Blocks: x (bm, K), xs (bm, nk), w (bn, K), ws (nk, bn) -> o (bm, bn)."""
    nk = xs_ref.shape[1]

    def promote(kb, acc):
        ks = pl.ds(pl.multiple_of(kb * TILE, TILE), TILE)
        part = lax.dot_general(x_ref[:, ks], w_ref[:, ks], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
        return acc + part * xs_ref[:, pl.ds(kb, 1)] * ws_ref[pl.ds(kb, 1), :]

    acc = lax.fori_loop(0, nk, promote, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _k_grid_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref):
    """Grid (M/bm, N/bn, nk); blocks x (bm, 128), xs (bm, 1), w (bn, 128), ws (1, bn)."""
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    part = lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
    acc_ref[...] += part * xs_ref[...] * ws_ref[...]

    @pl.when(kb == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "variant", "out_dtype", "interpret"))
def _pallas(xq, xs, wq, ws_cols, *, bm, bn, variant, out_dtype, interpret):
    (m, kp), n, nk = xq.shape, wq.shape[0], xs.shape[1]
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    if variant == "k_loop":
        return pl.pallas_call(
            _k_loop_kernel, out_shape=out_shape, grid=(m // bm, n // bn),
            in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
                      pl.BlockSpec((bm, nk), lambda i, j: (i, 0)),
                      pl.BlockSpec((bn, kp), lambda i, j: (j, 0)),
                      pl.BlockSpec((nk, bn), lambda i, j: (0, j))],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            interpret=interpret)(xq, xs, wq, ws_cols)
    # k_grid: scales reshaped so each grid step sees a (bm, 1) / (1, bn) slab whose
    # trailing dims satisfy TPU's (8, 128)-or-full-dim block rule.
    xs3 = xs.T[:, :, None]      # (nk, M, 1)
    ws3 = ws_cols[:, None, :]   # (nk, 1, N)
    params = None
    if interpret is False or interpret is None:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return pl.pallas_call(
        _k_grid_kernel, out_shape=out_shape, grid=(m // bm, n // bn, nk),
        in_specs=[pl.BlockSpec((bm, TILE), lambda i, j, k: (i, k)),
                  pl.BlockSpec((None, bm, 1), lambda i, j, k: (k, i, 0)),
                  pl.BlockSpec((bn, TILE), lambda i, j, k: (j, k)),
                  pl.BlockSpec((None, 1, bn), lambda i, j, k: (k, 0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=params, interpret=interpret)(xq, xs3, wq, ws3)


def _resolve_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"fp8_block_matmul: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return {"gpu": "mosaic_gpu", "tpu": "pallas"}.get(jax.default_backend(), "reference")


def fp8_block_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, *, impl: str = "auto",
                     interpret=None, tuning: Fp8MatmulTuning | None = None):
    """out (..., N) = dequant(xq, xs) @ dequant(wq, ws).T with FP32 promotion per 128 of K.

    xq (..., K) e4m3; xs (..., ceil(K/128)) f32 (1x128 tiles); wq (N, K) e4m3;
    ws (ceil(N/128), ceil(K/128)) f32 (128x128 blocks) or (N, ceil(K/128)) (per row).
    Any M, N, K: kernels get operands zero-padded to their tiles.  ``interpret``:
    None = interpret when the kernel's own backend is absent; True / an
    ``InterpretParams`` / ``InterpretGPUParams`` to force it.
    """
    impl = _resolve_impl(impl)
    lead, m, n, k, nk = _validate(xq, xs, wq, ws)
    if impl == "reference":
        return fp8_block_matmul_reference(xq, xs, wq, ws, out_dtype)
    t = tuning or Fp8MatmulTuning()
    backend = jax.default_backend()
    ws_variant = impl == "mosaic_gpu" and t.mosaic_variant in ("auto", "ws")
    if ws_variant:
        # Two consumer warpgroups of 64 rows: side by side along M, or along N when M is small.
        split = "m" if m > 64 else "n"
        bm, bn = (128, t.block_n) if split == "m" else (64, 2 * t.block_n)
    else:
        # Small M (decode): one 64-row warpgroup tile instead of a mostly-padded 128.
        bm = 64 if (m <= 64 and tuning is None) else t.block_m
        bn = t.block_n
    mp, np_, kp = cdiv(m, bm) * bm, cdiv(n, bn) * bn, nk * TILE
    x2 = pad_to(xq.reshape(m, k), (mp, kp))
    xs2 = pad_to(xs.reshape(m, nk), (mp, nk))
    w2 = pad_to(wq, (np_, kp))
    out_dtype = jnp.dtype(out_dtype)
    if impl == "pallas":
        variant = t.pallas_variant
        if variant == "auto":
            variant = "k_grid" if backend == "tpu" else "k_loop"
        if interpret is None:
            interpret = backend == "cpu"
        ws_cols = pad_to(_weight_scale_cols(ws, n), (nk, np_))
        out = _pallas(x2, xs2, w2, ws_cols, bm=bm, bn=bn, variant=variant,
                      out_dtype=out_dtype, interpret=interpret)
    else:
        if (interpret is None and backend != "gpu") or interpret is True:
            interpret = _mgpu.default_interpret_params()
        # Scalar block scales need a warpgroup's columns inside one 128-row weight block;
        # per-row scales (Wgrad) or wider tiles go through a per-column scale vector.
        column = (ws.shape[0] == n and n > 1) or TILE % t.block_n != 0
        if column:
            ws_k = pad_to(_weight_scale_cols(ws, n), (nk, np_))
        else:
            ws_k = pad_to(ws, (cdiv(np_, TILE), nk))
        if ws_variant:
            out = _mgpu.mgpu_block_matmul_ws(
                x2, xs2.T, w2, ws_k, tile_n=t.block_n, wg_split=split,
                max_concurrent_steps=t.max_concurrent_steps or 4, column_scales=column,
                out_dtype=out_dtype, interpret=interpret or None)
        else:
            out = _mgpu.mgpu_block_matmul(
                x2, xs2.T, w2, ws_k, block_m=bm, block_n=bn,
                max_concurrent_steps=t.max_concurrent_steps or 2, column_scales=column,
                out_dtype=out_dtype, interpret=interpret or None)
    return out[:m, :n].reshape(*lead, n)


# ----------------------------------------------------------------------------
# Differentiable linear layer: the three FP8 GEMMs of the report's Figure 6.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_linear(x, w, impl: str = "auto", pow2_scale: bool = False):
    """y (..., N) = x (..., K) @ w (N, K).T with both inputs quantized on the fly
    (1x128 / 128x128) and FP32 promotion; output in x.dtype.  Backward (§3.3):
    Dgrad dX = dY W with dY in 1x128 tiles and W's blocks transposed; Wgrad
    dW = dY^T X with dY and X re-quantized along tokens (128x1 tiles)."""
    return _fp8_linear_fwd(x, w, impl, pow2_scale)[0]


def _fp8_linear_fwd(x, w, impl, pow2_scale):
    xq, xs = quantize_act_1x128(x, pow2_scale=pow2_scale)
    wq, ws = quantize_weight_128x128(w, pow2_scale=pow2_scale)
    y = fp8_block_matmul(xq, xs, wq, ws, jnp.float32, impl=impl).astype(x.dtype)
    # Cache X already quantized for Wgrad (fp8 residual, as DeepSeek does).
    xt_q, xt_s = quantize_act_128x1(x.reshape(-1, x.shape[-1]), pow2_scale=pow2_scale)
    # Residuals must be arrays: an empty array carries w's dtype (dy carries x's).
    return y, (xt_q, xt_s, wq, ws, jnp.zeros((0,), w.dtype))


def _fp8_linear_bwd(impl, pow2_scale, res, dy):
    xt_q, xt_s, wq, ws, w_dtype_carrier = res
    dy2 = dy.reshape(-1, dy.shape[-1])                        # (M, N)
    dyq, dys = quantize_act_1x128(dy2, pow2_scale=pow2_scale)
    # dX (M, K) = dY (M, N) @ W (N, K): "weight" operand W^T (K, N), blocks transposed.
    dx = fp8_block_matmul(dyq, dys, wq.T, ws.T, jnp.float32, impl=impl)
    dyt_q, dyt_s = quantize_act_128x1(dy2, pow2_scale=pow2_scale)
    # dW (N, K) = dY^T (N, M) @ X (M, K): both operands carry per-row scales along M.
    dw = fp8_block_matmul(dyt_q.T, dyt_s.T, xt_q.T, xt_s.T, jnp.float32, impl=impl)
    dx = dx.reshape(*dy.shape[:-1], wq.shape[1]).astype(dy.dtype)
    return dx, dw.astype(w_dtype_carrier.dtype)


fp8_linear.defvjp(lambda x, w, impl, p2: _fp8_linear_fwd(x, w, impl, p2), _fp8_linear_bwd)
