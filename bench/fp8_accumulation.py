"""Why DeepSeek-V3 promotes FP8 partial sums to FP32 every 128 of K (report §3.3.2).

The report: Hopper's FP8 wgmma keeps only about 14 bits of its running sum, and
with K = 4096 on random matrices tensor-core-only accumulation reached a
maximum relative error of nearly 2%; promoting to FP32 CUDA-core registers every
N_C = 128 elements (4 wgmma k32 steps) fixes it.  The ISCA'25 paper (§3.1.1)
describes the datapath: the 32 products of one k32 step are aligned by
right-shifting to their largest exponent, only the top 13 fraction bits are
kept (the rest truncated), and the sum is accumulated into an FP22 register
(1 sign, 8 exponent, 13 mantissa bits).

This script emulates that datapath in float64 numpy and measures, against the
exact float64 product of the *same* FP8 operands (so only accumulation error is
counted):

  tc_only       the FP22 accumulator runs over all of K (per-tensor scales,
                since a tensor core cannot apply per-block scales mid-sum)
  promote_128   FP22 within each 128-wide K block, then block * scales added
                into an FP32 accumulator (1x128 / 128x128 fine-grained scales)
  fp32          FP32 accumulation of exact products (the CPU/bf16 reference)

Usage: python bench/fp8_accumulation.py [--k 4096] [--m 128] [--n 128]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.fp8_quant import (dequantize_act_1x128,  # noqa: E402
                                      dequantize_weight_128x128, quantize_act_1x128,
                                      quantize_weight_128x128)

CHUNK = 32        # products per wgmma k-step for 8-bit inputs
FRAC_BITS = 13    # fraction bits kept by the alignment and by the FP22 register
PROMOTE = 128     # N_C


def _truncate(v, lead_exp, bits):
    """Truncate v toward zero to a multiple of 2**(lead_exp - bits)."""
    q = np.exp2(lead_exp - bits)
    return np.trunc(v / q) * q


def _lead_exp(v):
    """Exponent of the leading bit (2**e <= |v| < 2**(e+1)); very small for zeros."""
    m, e = np.frexp(v)
    return np.where(m == 0, -1000, e - 1)


def tensor_core_sum(a8, b8, rounding="trunc", align_with_acc=False):
    """Emulated wgmma accumulation of a8 (M, L) . b8 (N, L) -> FP22 sums (M, N).

    Products of two e4m3 values are exact in float64; each k32 step aligns its
    32 products to their largest exponent, truncates to 13 fraction bits, and
    adds the sum into the FP22 accumulator.
    """
    acc = np.zeros((a8.shape[0], b8.shape[0]))
    for c in range(0, a8.shape[1], CHUNK):
        p = a8[:, None, c:c + CHUNK] * b8[None, :, c:c + CHUNK]
        emax = _lead_exp(np.abs(p).max(-1))
        if align_with_acc:  # the running sum joins the alignment as a 33rd addend
            emax = np.maximum(emax, _lead_exp(acc))
            acc = _truncate(acc, emax, FRAC_BITS)
        acc = acc + _truncate(p, emax[..., None], FRAC_BITS).sum(-1)
        e = _lead_exp(acc)
        if rounding == "trunc":                      # FP22 register: 13 mantissa bits
            acc = _truncate(acc, e, FRAC_BITS)
        else:
            q = np.exp2(e - FRAC_BITS)
            acc = np.round(acc / q) * q
    return acc


def emulate(a8, b8, a_scale, b_scale, *, promote, rounding, align_with_acc):
    """a8 (M, K), b8 (N, K) fp8 values as float64; scales per 128-K block:
    a_scale (M, K/128), b_scale (N, K/128).  Returns (M, N) float64."""
    if not promote:  # one scale pair for the whole sum (per-tensor scaling)
        return tensor_core_sum(a8, b8, rounding, align_with_acc) * (a_scale[:, :1] * b_scale[:, 0][None])
    out = np.zeros((a8.shape[0], b8.shape[0]), np.float32)
    for kb in range(a8.shape[1] // PROMOTE):
        sl = slice(kb * PROMOTE, (kb + 1) * PROMOTE)
        part = tensor_core_sum(a8[:, sl], b8[:, sl], rounding, align_with_acc)
        scale = a_scale[:, kb, None] * b_scale[None, :, kb]
        out = out + (part * scale).astype(np.float32)   # FP32 CUDA-core FMA
    return out.astype(np.float64)


def _rel_errors(approx, exact, normalise):
    err = np.abs(approx - exact)
    denom = np.abs(exact) if normalise == "elementwise" else np.sqrt(np.mean(exact ** 2))
    rel = err / denom
    return float(rel.max()), float(rel.mean())


MODELS = {  # name -> (FP22 rounding, does the running sum join the alignment?)
    "P1: align 32 products, RZ": ("trunc", False),
    "acc joins alignment, RZ": ("trunc", True),
    "align 32 products, RN": ("nearest", False),
}


def _operands(m, n, k, dist, rng):
    if dist == "rand":  # uniform [0, 1): no cancellation, elementwise error is meaningful
        return rng.random((m, k)).astype(np.float32), rng.random((n, k)).astype(np.float32)
    return (rng.standard_normal((m, k)).astype(np.float32),
            rng.standard_normal((n, k)).astype(np.float32))


def run(a, b, models):
    """-> rows (accumulation, datapath model, max rel err, mean rel err), metric name."""
    m, n, nk = a.shape[0], b.shape[0], a.shape[1] // PROMOTE
    norm = "elementwise" if (a >= 0).all() and (b >= 0).all() else "rms"
    # Tensor-core-only: per-tensor scales (no way to apply block scales mid-sum).
    sa, sb = np.abs(a).max() / 448, np.abs(b).max() / 448
    a8 = np.asarray(jnp.asarray(a / sa).astype(jnp.float8_e4m3fn), np.float64)
    b8 = np.asarray(jnp.asarray(b / sb).astype(jnp.float8_e4m3fn), np.float64)
    exact = (a8 @ b8.T) * sa * sb
    # Promoted path: DeepSeek's fine-grained operands (1x128 and 128x128 scales).
    aq, as_ = quantize_act_1x128(jnp.asarray(a))
    bq, bs = quantize_weight_128x128(jnp.asarray(b))
    a8f, b8f, as_ = np.asarray(aq, np.float64), np.asarray(bq, np.float64), np.asarray(as_)
    b_cols = np.repeat(np.asarray(bs, np.float64), 128, axis=0)[:n]    # (N, nk)
    exact_f = np.asarray(dequantize_act_1x128(aq, jnp.asarray(as_)), np.float64) @ \
        np.asarray(dequantize_weight_128x128(bq, bs), np.float64).T
    rows = []
    for name in models:
        rounding, with_acc = MODELS[name]
        tc = emulate(a8, b8, np.full((m, nk), sa), np.full((n, nk), sb), promote=False,
                     rounding=rounding, align_with_acc=with_acc)
        pr = emulate(a8f, b8f, as_, b_cols, promote=True, rounding=rounding,
                     align_with_acc=with_acc)
        rows.append(("tensor core only", name, *_rel_errors(tc, exact, norm)))
        rows.append(("promote FP32 every 128", name, *_rel_errors(pr, exact_f, norm)))
    f32 = np.zeros((m, n), np.float32)
    for kb in range(nk):
        sl = slice(kb * PROMOTE, (kb + 1) * PROMOTE)
        part = a8f[:, sl].astype(np.float32) @ b8f[:, sl].T.astype(np.float32)
        f32 += part * (as_[:, kb, None] * b_cols[None, :, kb]).astype(np.float32)
    rows.append(("FP32 throughout", "exact products", *_rel_errors(f32, exact_f, norm)))
    return rows, ("|err|/|y|" if norm == "elementwise" else "|err|/rms(y)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.k % PROMOTE:
        raise SystemExit(f"--k must be a multiple of {PROMOTE}, got {args.k}")
    rng = np.random.default_rng(args.seed)
    print(f"M={args.m} N={args.n} K={args.k}: k{CHUNK} steps, {FRAC_BITS} fraction bits, "
          f"FP22 accumulator; promotion every {PROMOTE}; error vs float64 on the same fp8 "
          "operands")
    print(f"{'inputs':<7}{'metric':<14}{'accumulation':<24}{'datapath model':<28}"
          f"{'max rel err':>12}{'mean rel err':>14}")
    for dist in ("rand", "randn"):
        rows, metric = run(*_operands(args.m, args.n, args.k, dist, rng), list(MODELS))
        for acc, model, mx, mean in rows:
            print(f"{dist:<7}{metric:<14}{acc:<24}{model:<28}{mx:>11.4%}{mean:>13.4%}")


if __name__ == "__main__":
    main()
