"""Why MTP verification costs more than a plain decode step on XLA:CPU: the same weights times 1, 2
or 8 rows (a decode step at batch 1, a verification with one draft, a batch of 8).

A chain of --layers pairs of float32 linears ([rows, 256] -> [rows, 1024] -> [rows, 256], a
different weight pair per layer, as in a decode step: every weight is read once per call) in one
jitted program, timed per layer pair, in four forms of the same product: an einsum (weights [out,
in]), one matrix-vector product per row (what `layers.matmul_nt` does on CPU for 2-3 rows), and
multiply-and-sum with the rows outermost or innermost (the fastest here; inside the model XLA
materialised the product instead of fusing it into the sum, so the model does not use it). Memory traffic is the
same for every row count (the weights dominate), so on a memory-bound device the time would be too.

    python bench/small_m_matmul.py
    python bench/small_m_matmul.py --dim 1024 --inter 3072 --layers 8 --rows 1 2 4 8 16 32   # weights from memory
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

FORMS = {
    "einsum": lambda x, w: jnp.einsum("mk,nk->mn", x, w),
    "per-row matvec": lambda x, w: jnp.concatenate([jnp.einsum("k,nk->n", x[i], w)[None] for i in range(x.shape[0])]),
    "multiply-sum": lambda x, w: (x[:, None, :] * w[None]).sum(-1),
    "multiply-sum, rows inner": lambda x, w: (w[:, None, :] * x[None]).sum(-1).T,
}


def chain(form, x, ws, vs):
    for w, v in zip(ws, vs):
        x = x + form(jnp.tanh(form(x, w)), v)
    return x


def per_layer_us(f, args, layers: int, repeats: int = 30) -> float:
    f(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6 / layers


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(0.05 * rng.standard_normal((args.inter, args.dim)), jnp.float32) for _ in range(args.layers)]
    vs = [jnp.asarray(0.05 * rng.standard_normal((args.dim, args.inter)), jnp.float32) for _ in range(args.layers)]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores; us per layer pair "
          f"({args.dim} -> {args.inter} -> {args.dim}, float32), median of 30")
    print("| rows | " + " | ".join(FORMS) + " | einsum / 1 row |")
    print("|---" * (len(FORMS) + 2) + "|")
    base = None
    for rows in args.rows:
        x = jnp.asarray(rng.standard_normal((rows, args.dim)), jnp.float32)
        t = {k: per_layer_us(jax.jit(lambda x, ws, vs, f=f: chain(f, x, ws, vs)), (x, ws, vs), args.layers)
             for k, f in FORMS.items()}
        base = base or t["einsum"]
        print(f"| {rows} | " + " | ".join(f"{v:.0f}" for v in t.values()) + f" | {t['einsum'] / base:.2f}x |")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
