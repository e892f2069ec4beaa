"""Benchmark of the FP8 block-scaled GEMM on DeepSeek-V3's shapes (report §3.3).

For each (M, N, K) it prints the TFLOP/s of our kernel (Mosaic GPU on GPU, the
Pallas kernel on TPU), of XLA's bf16 ``jnp.dot`` and of XLA's FP8 dot with
per-tensor scales (cuBLASLt ``__cublas$lt$matmul$f8`` on H100 when the rewrite
fires: the "lt-f8" column says whether it did), the kernel/bf16 ratio, and:

  err_ref    max |kernel - reference| / max |reference|  (same fp8 operands;
             should be ~1e-7 for f32 accumulation, ~4e-3 with a bf16 output)
  q_block    quantization error of the fine-grained (1x128 / 128x128) FP8
             product vs the bf16-input product, worst row: max_r |d_r| / |y_r|
  q_tensor   the same for per-tensor scaling.  Activations get per-token
             outliers (log-uniform row scales over e^±5): per-tensor scaling
             pushes the small rows into e4m3's subnormals, 1x128 tiles do not

Shapes: M = 4096 (prefill/training) and 64, 128 (decode) against DeepGEMM's
(N, K) = (7168, 16384), (4096, 7168), (2112, 7168), (24576, 1536).  On CPU (or
with --cpu-small) it runs a correctness-only sweep on small shapes with the
kernels in interpret mode; the timings there are meaningless.

--sweep instead checks and times tuning points of both Mosaic GPU kernels at 4096x7168x16384
(a small shape in interpret mode on CPU).

Usage: python bench/fp8_matmul.py [--cpu-small] [--iters 20] [--impl mosaic_gpu] [--sweep]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels import fp8_matmul_mgpu as mgpu  # noqa: E402
from pallas_kernels import (Fp8MatmulTuning, fp8_block_matmul,  # noqa: E402
                            fp8_block_matmul_reference, quantize_act_1x128,
                            quantize_weight_128x128)

NK_SHAPES = [(7168, 16384), (4096, 7168), (2112, 7168), (24576, 1536)]
FULL_SHAPES = [(m, n, k) for m in (4096, 128, 64) for n, k in NK_SHAPES]
SMALL_SHAPES = [(256, 256, 512), (256, 192, 384), (200, 130, 300), (64, 256, 512)]
H100_FP8_PEAK_TFLOPS = 1979.0   # dense, SXM


def timed(fn, *args, iters):
    """Seconds per call of fn(*args): the median over 5 rounds of `iters` back-to-back
    calls (dispatch is asynchronous, so launch overhead hides behind the previous call;
    one host sync per round), after a warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - t0) / iters)
    return statistics.median(rounds)


def _dot_nt(a, b, out_dtype):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)


@jax.jit
def xla_bf16(x, w):
    return _dot_nt(x, w, jnp.bfloat16)


@jax.jit
def xla_fp8_per_tensor(x8, w8, sx, sw):
    return (_dot_nt(x8, w8, jnp.float32) * (sx * sw)).astype(jnp.bfloat16)


def make_inputs(m, n, k, key):
    kx, kr, kw = jax.random.split(key, 3)
    rows = jnp.exp(jax.random.uniform(kr, (m, 1), minval=-5.0, maxval=5.0))
    x = (jax.random.normal(kx, (m, k)) * rows).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (n, k)) * 0.02).astype(jnp.bfloat16)
    return x, w


def per_tensor_fp8(a):
    s = jnp.max(jnp.abs(a.astype(jnp.float32))) / 448.0
    return (a.astype(jnp.float32) / s).astype(jnp.float8_e4m3fn), s


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _worst_row_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def bench_shape(m, n, k, impl, tuning, interpret, iters, key):
    x, w = make_inputs(m, n, k, key)
    xq, xs = jax.jit(quantize_act_1x128)(x)
    wq, ws = jax.jit(quantize_weight_128x128)(w)
    kernel = jax.jit(functools.partial(fp8_block_matmul, out_dtype=jnp.bfloat16, impl=impl,
                                       tuning=tuning, interpret=interpret))
    x8, sx = per_tensor_fp8(x)
    w8, sw = per_tensor_fp8(w)
    t_kernel = timed(kernel, xq, xs, wq, ws, iters=iters)
    t_bf16 = timed(xla_bf16, x, w, iters=iters)
    t_fp8 = timed(xla_fp8_per_tensor, x8, w8, sx, sw, iters=iters)
    hlo = xla_fp8_per_tensor.lower(x8, w8, sx, sw).compile().as_text()
    ref = fp8_block_matmul_reference(xq, xs, wq, ws)          # f32 output
    y = _dot_nt(x, w, jnp.float32)                             # bf16 inputs, f32 sums
    out = kernel(xq, xs, wq, ws)
    flops = 2.0 * m * n * k
    return dict(
        m=m, n=n, k=k, kernel=flops / t_kernel / 1e12, bf16=flops / t_bf16 / 1e12,
        fp8=flops / t_fp8 / 1e12, lt_f8="__cublas$lt$matmul$f8" in hlo,
        err_ref=_max_rel(out, ref), q_block=_worst_row_rel(ref, y),
        q_tensor=_worst_row_rel(xla_fp8_per_tensor(x8, w8, sx, sw), y))


def sweep(iters):
    """Tuning points of both Mosaic kernels against the reference, timed like the table."""
    on_gpu = jax.default_backend() == "gpu"
    m, n, k = (4096, 7168, 16384) if on_gpu else (256, 256, 256)
    interpret = None if on_gpu else mgpu.default_interpret_params()
    kx, kw = jax.random.split(jax.random.key(0))
    xq, xs = quantize_act_1x128(jax.random.normal(kx, (m, k), jnp.float32))
    wq, ws = quantize_weight_128x128(jax.random.normal(kw, (n, k), jnp.float32) * 0.02)
    ref = fp8_block_matmul_reference(xq, xs, wq, ws)
    print(f"M={m} N={n} K={k} backend={jax.default_backend()}"
          + ("" if on_gpu else " (interpret: correctness only)"))
    points = [("simple", dict(block_m=128, block_n=128, max_concurrent_steps=2))]
    points += [("ws", dict(tile_n=128, max_concurrent_steps=s, grid_minor=g, grid_width=w))
               for s in (3, 4, 5) for g in (0, 1) for w in (2, 4, 8, 16)]
    for variant, kw in points:
        fn = mgpu.mgpu_block_matmul if variant == "simple" else mgpu.mgpu_block_matmul_ws
        f = functools.partial(fn, interpret=interpret, **kw)
        try:
            out = jax.block_until_ready(f(xq, xs.T, wq, ws))
        except Exception as e:  # noqa: BLE001  (a point that does not fit: report, go on)
            print(f"{variant:<7}{kw}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        err = _max_rel(out, ref)
        tflops = 2 * m * n * k / timed(f, xq, xs.T, wq, ws, iters=iters) / 1e12
        print(f"{variant:<7}{kw}  max rel err {err:.1e}  {tflops:7.1f} TFLOP/s = "
              f"{100 * tflops / 1358:5.1f}% of DeepGEMM's 1358")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-small", action="store_true",
                    help="small shapes, kernels in interpret mode (automatic on CPU)")
    ap.add_argument("--impl", default=None, choices=["mosaic_gpu", "pallas", "reference"])
    ap.add_argument("--mosaic-variants", default="ws,simple",
                    help="Fp8MatmulTuning.mosaic_variant values to time (mosaic_gpu only)")
    ap.add_argument("--steps", type=int, default=None, help="max_concurrent_steps")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--block-m", type=int, default=None)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="tune the Mosaic GPU kernels instead")
    args = ap.parse_args()
    backend = jax.default_backend()
    small = args.cpu_small or backend == "cpu"
    if args.sweep:
        return sweep(args.iters or (1 if small else 10))
    impls = [args.impl] if args.impl else (
        ["mosaic_gpu", "pallas"] if small else
        ["mosaic_gpu" if backend == "gpu" else "pallas"])
    iters = args.iters or (1 if small else 20)
    shapes = SMALL_SHAPES if small else FULL_SHAPES
    print(f"backend={backend} device={jax.devices()[0].device_kind} jax={jax.__version__} "
          f"mode={'cpu-small (interpret; timings meaningless)' if small else 'full'}")
    head = (f"{'impl':<14}{'M':>6}{'N':>7}{'K':>7}{'kernel TF/s':>13}{'bf16 TF/s':>11}"
            f"{'fp8/t TF/s':>12}{'lt-f8':>7}{'k/bf16':>8}{'err_ref':>10}{'q_block':>9}"
            f"{'q_tensor':>10}")
    if backend == "gpu" and not small:
        head += f"{'%fp8pk':>8}"
    print(head)
    key = jax.random.key(0)
    runs = [(impl, v) for impl in impls
            for v in (args.mosaic_variants.split(",") if impl == "mosaic_gpu" else ["auto"])]
    for impl, variant in runs:
        label = impl if variant == "auto" else f"{impl[:6]}:{variant}"
        for m, n, k in shapes:
            bm = args.block_m or (64 if m <= 64 else 128)
            tuning = Fp8MatmulTuning(block_m=bm, block_n=args.block_n, mosaic_variant=variant,
                                     max_concurrent_steps=args.steps)
            interpret = True if small and impl != "reference" else None
            r = bench_shape(m, n, k, impl, tuning, interpret, iters, key)
            line = (f"{label:<14}{m:>6}{n:>7}{k:>7}{r['kernel']:>13.3f}{r['bf16']:>11.3f}"
                    f"{r['fp8']:>12.3f}{'yes' if r['lt_f8'] else 'no':>7}"
                    f"{r['kernel'] / r['bf16']:>8.2f}{r['err_ref']:>10.1e}"
                    f"{r['q_block']:>9.1e}{r['q_tensor']:>10.1e}")
            if backend == "gpu" and not small:
                line += f"{100 * r['kernel'] / H100_FP8_PEAK_TFLOPS:>7.1f}%"
            print(line, flush=True)


if __name__ == "__main__":
    main()
