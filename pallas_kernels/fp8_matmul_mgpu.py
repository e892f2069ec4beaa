"""Mosaic GPU (Hopper wgmma) FP8 block-scaled GEMM: DeepSeek-V3 report §3.3.2.

Hopper's FP8 wgmma keeps only ~14 bits of its running sum (§3.3.2; "FP22" with
13 fraction bits in the ISCA'25 paper), so the report promotes partial sums to
FP32 CUDA-core registers every N_C = 128 elements of K, which is also where the
fine-grained scales are applied.  This kernel does exactly that, as in
DeepGEMM:

    for each 128-wide K block (one TMA pipeline step, 4 wgmma k32 instructions):
        acc   = wgmma(x_tile, w_tile^T)           # fresh ACC, tensor-core precision
        carry += acc * x_scale[:, None] * w_scale  # FP32 promotion with the scales

Layouts (all checked by ``mgpu_block_matmul``):
  xq   (M, K) e4m3           row-major, K-major: fp8 wgmma supports no transposes
  xs_t (K/128, M) f32        activation scales *transposed* (DeepGEMM's
                             "TMA-aligned" LHS scale layout): a tile's row
                             scales are contiguous
  wq   (N, K) e4m3           DeepSeek's checkpoint layout, already K-major; the
                             SMEM tile is fed to wgmma as ``w_smem.T``
  ws   (N/128, K/128) f32    block scales ("block" mode, block_n divides 128),
    or (K/128, N) f32        one scale per output column ("column" mode: any
                             block_n, and the per-row B scales of Wgrad)
Scales are read straight from GMEM: loading them from a pipeline-managed SMEM
buffer was flagged as a race against the next TMA write by the interpreter.

Two kernels over the same operands:
  mgpu_block_matmul      one warpgroup per output tile, a TMA pipeline along K ("simple")
  mgpu_block_matmul_ws   warp-specialized and persistent ("ws", the default): a TMA producer
                         warpgroup, two consumer warpgroups, tiles in snake order
Both run in GPU interpret mode on CPU (``interpret=plgpu.InterpretGPUParams()``) and compiled on
an H100 (tests marked ``gpu``; figures in docs/BENCHMARKS.md: "ws" 944 TFLOP/s at
4096x7168x16384).  Interpret mode sums exactly; the hardware's wgmma keeps ~13 fraction bits
within a K block, which the compiled tests' tolerance accounts for.  Not done yet: scales through
the TMA pipeline (they are unoptimized GMEM loads), epilogue overlapped with the next tile, TMA
multicast in a 2-CTA cluster, a grouped (MoE) variant.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import FP8, TILE, cdiv

try:  # Mosaic GPU is experimental; the package must import without it.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    HAS_MGPU = True
except ImportError:  # pragma: no cover - depends on the jax build
    pl = plgpu = None
    HAS_MGPU = False

BLOCK_K = TILE  # = N_C, the promotion interval; also the scale granularity along K


def default_interpret_params(detect_races: bool = False):
    """GPU interpret mode (simulated SMEM/TMA/wgmma/barriers on CPU)."""
    if not HAS_MGPU:
        raise ImportError("jax.experimental.pallas.mosaic_gpu is not available")
    return plgpu.InterpretGPUParams(detect_races=detect_races)


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _validate(xq, xs_t, wq, ws, block_m, block_n, max_concurrent_steps, column_scales):
    m, k = xq.shape
    n = wq.shape[0]
    nk = k // BLOCK_K
    _check(xq.dtype == FP8 and wq.dtype == FP8,
           f"mgpu_block_matmul: xq and wq must be float8_e4m3fn, got {xq.dtype}, {wq.dtype}")
    _check(wq.shape[1] == k, f"mgpu_block_matmul: wq shape {wq.shape} does not "
           f"match xq shape {xq.shape} along K (expected (N, {k}))")
    _check(block_m % 64 == 0, f"mgpu_block_matmul: block_m={block_m} must be a multiple "
           "of 64 (one warpgroup's wgmma M)")
    _check(block_n % 8 == 0 and 8 <= block_n <= 256,
           f"mgpu_block_matmul: block_n={block_n} must be a multiple of 8 in [8, 256]")
    _check(max_concurrent_steps >= 1,
           f"mgpu_block_matmul: max_concurrent_steps={max_concurrent_steps} must be >= 1")
    _check(m % block_m == 0 and n % block_n == 0 and k % BLOCK_K == 0,
           f"mgpu_block_matmul: (M, N, K)={(m, n, k)} must be multiples of "
           f"({block_m}, {block_n}, {BLOCK_K}); fp8_block_matmul pads for you")
    _check(xs_t.shape == (nk, m) and xs_t.dtype == jnp.float32,
           f"mgpu_block_matmul: xs_t must be float32 of shape {(nk, m)}, got "
           f"{xs_t.dtype}{tuple(xs_t.shape)}")
    if column_scales:
        want = (nk, n)
    else:
        _check(BLOCK_K % block_n == 0, f"mgpu_block_matmul: block weight scales need "
               f"block_n dividing {BLOCK_K}, got block_n={block_n}")
        want = (cdiv(n, BLOCK_K), nk)
    _check(ws.shape == want and ws.dtype == jnp.float32,
           f"mgpu_block_matmul: ws must be float32 of shape {want}, got "
           f"{ws.dtype}{tuple(ws.shape)}")


def _kernel_body(x_g, xs_g, w_g, ws_g, o_g, o_smem, *, block_m, block_n, num_k,
                 max_concurrent_steps, column_scales, out_dtype):
    """One (block_m, block_n) output tile per CTA (one compute warpgroup)."""
    pm, pn = lax.axis_index("m"), lax.axis_index("n")
    row_layout = plgpu.Layout.WGMMA.reduce(1)  # a (block_m,) vector, one per acc row
    col_layout = plgpu.Layout.WGMMA.reduce(0)  # a (block_n,) vector, one per acc column

    def block_mma(x_smem, w_smem):
        # A fresh ACC per 128-wide K block: this is the limited-precision part.
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, x_smem, w_smem.T)  # both operands K-major (fp8 rule)
            plgpu.wgmma_wait(0)
            return acc_ref[...]
        return pl.run_scoped(mma, plgpu.ACC((block_m, block_n), jnp.float32))

    def promote(carry, part, ki):
        # FP32 promotion with the scales (DeepGEMM's CUDA-core FMAs).  The scale vectors
        # come straight from GMEM in the accumulator's row / column layout; the compiled
        # lowering has only an unoptimized path for GMEM -> registers, hence optimized=False.
        sx = plgpu.load(xs_g.at[ki, pl.ds(pm * block_m, block_m)], layout=row_layout,
                        optimized=False)
        if column_scales:
            sw = plgpu.load(ws_g.at[ki, pl.ds(pn * block_n, block_n)], layout=col_layout,
                            optimized=False)
            scale = (lax.broadcast_in_dim(sx, part.shape, [0])
                     * lax.broadcast_in_dim(sw, part.shape, [1]))
        else:  # one scalar per 128x128 weight block: fold it into the row vector
            sw = ws_g[(pn * block_n) // BLOCK_K, ki]
            scale = lax.broadcast_in_dim(sx * sw, part.shape, [0])
        return carry + part * scale

    def step(idx, x_smem, w_smem, carry):
        (ki,) = idx
        return promote(carry, block_mma(x_smem, w_smem), ki)

    init = plgpu.layout_cast(jnp.zeros((block_m, block_n), jnp.float32),
                             plgpu.Layout.WGMMA)
    acc = plgpu.emit_pipeline(
        step,
        grid=(num_k,),
        max_concurrent_steps=max_concurrent_steps,
        init_carry=init,
        in_specs=[plgpu.BlockSpec((block_m, BLOCK_K), lambda ki: (pm, ki)),
                  plgpu.BlockSpec((block_n, BLOCK_K), lambda ki: (pn, ki))],
    )(x_g, w_g)
    # Epilogue: registers -> SMEM -> TMA store.
    o_smem[...] = acc.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        o_smem, o_g.at[pl.ds(pm * block_m, block_m), pl.ds(pn * block_n, block_n)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=(
    "block_m", "block_n", "max_concurrent_steps", "column_scales", "out_dtype", "interpret"))
def _mgpu_call(xq, xs_t, wq, ws, *, block_m, block_n, max_concurrent_steps,
               column_scales, out_dtype, interpret):
    m, k = xq.shape
    n = wq.shape[0]
    body = functools.partial(
        _kernel_body, block_m=block_m, block_n=block_n, num_k=k // BLOCK_K,
        max_concurrent_steps=max_concurrent_steps, column_scales=column_scales,
        out_dtype=out_dtype)
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_types=dict(o_smem=plgpu.SMEM((block_m, block_n), out_dtype)),
        grid=(m // block_m, n // block_n),
        grid_names=("m", "n"),
        interpret=interpret,
    )
    return call(xq, xs_t, wq, ws)


def mgpu_block_matmul(xq, xs_t, wq, ws, *, block_m: int = 128, block_n: int = 128,
                      max_concurrent_steps: int = 2, column_scales: bool = False,
                      out_dtype=jnp.float32, interpret=None):
    """out (M, N) = sum_k (xq_k @ wq_k^T) * xs_t[k][:, None] * w_scale_k, on aligned operands.

    xq (M, K) e4m3, xs_t (K/128, M) f32, wq (N, K) e4m3, ws (N/128, K/128) f32
    or, with ``column_scales=True``, (K/128, N) f32.  M, N, K must be multiples
    of (block_m, block_n, 128): use ``fp8_block_matmul`` for general shapes.
    ``interpret``: None (compile for the GPU) or ``plgpu.InterpretGPUParams``.
    """
    if not HAS_MGPU:
        raise ImportError("jax.experimental.pallas.mosaic_gpu is not available")
    _validate(xq, xs_t, wq, ws, block_m, block_n, max_concurrent_steps, column_scales)
    return _mgpu_call(xq, xs_t, wq, ws, block_m=block_m, block_n=block_n,
                      max_concurrent_steps=max_concurrent_steps,
                      column_scales=column_scales, out_dtype=jnp.dtype(out_dtype),
                      interpret=interpret)


# ---------------------------------------------------------------- warp-specialized, persistent

def _ws_kernel_body(x_g, xs_g, w_g, ws_g, o_g, o_smem, *, tile_m, tile_n, wg_split, num_k,
                    max_concurrent_steps, column_scales, out_dtype, grid_minor, grid_width):
    """DeepGEMM's structure in Pallas: one TMA producer warpgroup and two consumer warpgroups
    per CTA, a persistent loop over output tiles (L2-friendly snake order).

    Each consumer owns a (tile_m, tile_n) slice of the CTA tile (split along M or N) and keeps
    its FP32 accumulator in registers as the pipeline carry; per 128-wide K block it runs a
    fresh wgmma ACC and promotes it with the scales.  While one consumer does its promotion
    FMAs on the CUDA cores, the other's wgmma keeps the tensor cores busy (the report's
    "overlap of MMA and promotion", §3.3.2), so no ping-pong accumulators are needed.
    """
    wg = lax.axis_index("wg")
    cta_m = tile_m * (2 if wg_split == "m" else 1)
    cta_n = tile_n * (2 if wg_split == "n" else 1)
    m_iters = x_g.shape[0] // cta_m
    n_iters = w_g.shape[0] // cta_n
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(num_k,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=max_concurrent_steps, compute_context=compute_context,
            in_specs=[plgpu.BlockSpec((cta_m, BLOCK_K), lambda ki: (0, ki)),
                      plgpu.BlockSpec((cta_n, BLOCK_K), lambda ki: (0, ki))])

    ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the bodies)

    @functools.partial(pl.run_scoped,
                       allocs=pipeline(ignore, ignore).get_allocations(x_g, w_g),
                       collective_axes="wg")
    def _scope(allocs):
        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), grid_minor, grid_width)
            m0 = mi * cta_m + (wg * tile_m if wg_split == "m" else 0)
            n0 = ni * cta_n + (wg * tile_n if wg_split == "n" else 0)
            rows = pl.ds(wg * tile_m, tile_m) if wg_split == "m" else slice(None)
            cols = pl.ds(wg * tile_n, tile_n) if wg_split == "n" else slice(None)

            def scale_of(ki, shape):
                sx = plgpu.load(xs_g.at[ki, pl.ds(m0, tile_m)], layout=row_layout,
                                optimized=False)
                if column_scales:
                    sw = plgpu.load(ws_g.at[ki, pl.ds(n0, tile_n)], layout=col_layout,
                                    optimized=False)
                    return (lax.broadcast_in_dim(sx, shape, [0])
                            * lax.broadcast_in_dim(sw, shape, [1]))
                return lax.broadcast_in_dim(sx * ws_g[n0 // BLOCK_K, ki], shape, [0])

            def body(idx, x_smem, w_smem, carry):
                (ki,) = idx

                def mma(acc_ref):
                    plgpu.wgmma(acc_ref, x_smem.at[rows], w_smem.at[cols].T)
                    scale = scale_of(ki, (tile_m, tile_n))  # GMEM latency hides behind the MMA
                    plgpu.wgmma_wait(0)
                    return acc_ref[...], scale

                part, scale = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), jnp.float32))
                return carry + part * scale

            def compute_context(run):
                acc = run(plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32),
                                            plgpu.Layout.WGMMA))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's store left SMEM
                o_smem[wg] = acc.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg],
                                        o_g.at[pl.ds(m0, tile_m), pl.ds(n0, tile_n)])

            pipeline(body, compute_context)(
                x_g.at[pl.ds(mi * cta_m, cta_m)], w_g.at[pl.ds(ni * cta_n, cta_n)],
                allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _num_sms() -> int:
    if jax.default_backend() == "gpu":
        return jax.devices()[0].core_count
    return 4  # interpret mode: a few "SMs" exercise the persistent loop


@functools.partial(jax.jit, static_argnames=(
    "tile_m", "tile_n", "wg_split", "max_concurrent_steps", "column_scales", "out_dtype",
    "grid_minor", "grid_width", "num_sms", "interpret"))
def _mgpu_ws_call(xq, xs_t, wq, ws, *, tile_m, tile_n, wg_split, max_concurrent_steps,
                  column_scales, out_dtype, grid_minor, grid_width, num_sms, interpret):
    m, k = xq.shape
    n = wq.shape[0]
    body = functools.partial(
        _ws_kernel_body, tile_m=tile_m, tile_n=tile_n, wg_split=wg_split, num_k=k // BLOCK_K,
        max_concurrent_steps=max_concurrent_steps, column_scales=column_scales,
        out_dtype=out_dtype, grid_minor=grid_minor, grid_width=grid_width)
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_types=dict(o_smem=plgpu.SMEM((2, tile_m, tile_n), out_dtype)),
        grid=(num_sms,), grid_names=("sm",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return call(xq, xs_t, wq, ws)


def mgpu_block_matmul_ws(xq, xs_t, wq, ws, *, tile_m: int = 64, tile_n: int = 128,
                         wg_split: str = "m", max_concurrent_steps: int = 4,
                         column_scales: bool = False, out_dtype=jnp.float32,
                         grid_minor: int = 0, grid_width: int = 4, num_sms: int | None = None,
                         interpret=None):
    """``mgpu_block_matmul`` as a warp-specialized persistent kernel (same operands).

    The CTA tile is (2 tile_m, tile_n) with ``wg_split="m"`` or (tile_m, 2 tile_n) with
    "n" (small M, decode); M, N must be multiples of it.  grid_minor / grid_width: the
    tile order (``plgpu.planar_snake``: minor dimension 0 = M, 1 = N, band width).
    """
    if not HAS_MGPU:
        raise ImportError("jax.experimental.pallas.mosaic_gpu is not available")
    _check(wg_split in ("m", "n"), f"mgpu_block_matmul_ws: wg_split={wg_split!r}, "
           "expected 'm' or 'n'")
    _check(tile_m == 64, f"mgpu_block_matmul_ws: tile_m={tile_m}: one consumer warpgroup "
           "owns 64 rows (its wgmma M); widen the CTA with wg_split='m'")
    cta_m = tile_m * (2 if wg_split == "m" else 1)
    cta_n = tile_n * (2 if wg_split == "n" else 1)
    _validate(xq, xs_t, wq, ws, cta_m, tile_n, max_concurrent_steps, column_scales)
    _check(wq.shape[0] % cta_n == 0, f"mgpu_block_matmul_ws: N={wq.shape[0]} must be a "
           f"multiple of the CTA tile's {cta_n} columns")
    return _mgpu_ws_call(xq, xs_t, wq, ws, tile_m=tile_m, tile_n=tile_n, wg_split=wg_split,
                         max_concurrent_steps=max_concurrent_steps,
                         column_scales=column_scales, out_dtype=jnp.dtype(out_dtype),
                         grid_minor=grid_minor, grid_width=grid_width,
                         num_sms=num_sms or _num_sms(), interpret=interpret)
