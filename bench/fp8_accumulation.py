"""Why DeepSeek-V3 promotes FP8 partial sums to FP32 every 128 of K (report §3.3.2).

Prints the accumulation-error table of `dsv3_jax.analysis.fp8`, which emulates Hopper's FP8
wgmma datapath (k32 steps aligned to 13 fraction bits, an FP22 accumulator) in float64 numpy
and compares, against the exact float64 product of the same FP8 operands:

  tensor core only        the FP22 accumulator runs over all of K (per-tensor scales)
  promote FP32 every 128  FP22 within each 128-wide K block, then block * scales added into an
                          FP32 accumulator (1x128 / 128x128 fine-grained scales)
  FP32 throughout         FP32 accumulation of exact products (the CPU/bf16 reference)

for three readings of the datapath, on uniform [0, 1) inputs (error per element) and normal
inputs (error over rms(y)). `python -m dsv3_jax.analysis` reports one line of it beside the
paper's figure.

Usage: python bench/fp8_accumulation.py [--k 4096] [--m 128] [--n 128]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dsv3_jax.analysis.fp8 import CHUNK, DATAPATHS, FRAC_BITS, PROMOTE, operands, run  # noqa: E402


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
        rows, metric = run(*operands(args.m, args.n, args.k, dist, rng), list(DATAPATHS))
        for acc, model, mx, mean in rows:
            print(f"{dist:<7}{metric:<14}{acc:<24}{model:<28}{mx:>11.4%}{mean:>13.4%}")


if __name__ == "__main__":
    main()
