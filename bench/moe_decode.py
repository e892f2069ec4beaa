"""The routed experts at decode sizes on this backend: the forms `tiled_routed_experts` chooses
between, timed in one run on the same rows and weights (microseconds per call, best of 5):

  copy loop   tiles of one row (`copy_loop_experts`): reads the activated experts only
  tiles       the tile-padded loop at `tile_rows`' height
  dense       every expert on every row (`dense_reference`): reads each expert once, E/K x the FLOPs

and which one the default picks (`rows_cover_experts`). Weights as bench/decode.py's models: E 16
experts, top-4, float32; "bench" F 128 x D 256, "large" F 512 x D 1024 (100 MB of experts per
layer, streamed from memory).

    python bench/moe_decode.py                  # both shapes, rows 1..32; ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.experts import (copy_loop_experts, dense_reference, rows_cover_experts, tile_rows,  # noqa: E402
                              tiled_routed_experts)

E, K = 16, 4
SHAPES = {"bench": (128, 256), "large": (512, 1024)}


def best_us(fn, args, seconds: float = 0.2) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    n = max(2, int(seconds / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / n)
    return 1e6 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = p.parse_args()
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; E {E}, top-{K}, float32")
    print("\n| shape | rows | copy loop (us) | tiles (us, height) | dense (us) | default picks | best / picked |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        F, D = SHAPES[shape]
        w1, w3 = (jnp.asarray(rng.normal(0, 0.05, (E, F, D)), jnp.float32) for _ in range(2))
        w2 = jnp.asarray(rng.normal(0, 0.05, (E, D, F)), jnp.float32)
        for N in args.rows:
            ids = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]), jnp.int32)
            call = (jnp.asarray(rng.normal(size=(N, D)), jnp.float32), jnp.full((N, K), 1 / K), ids)
            tile = tile_rows(N * K, E)
            tiles = max(tile, 2)  # tiles of one row are the copy loop
            times = {
                "copy loop": best_us(lambda x, g, i: copy_loop_experts(x, g, i, w1, w2, w3, dtype=jnp.float32), call),
                f"tiles of {tiles}": best_us(
                    lambda x, g, i: tiled_routed_experts(x, g, i, w1, w2, w3, dtype=jnp.float32, tile=tiles), call),
                "dense": best_us(lambda x, g, i: dense_reference(x, g, i, w1, w2, w3, dtype=jnp.float32), call),
            }
            picked = "dense" if rows_cover_experts(N, K, E) else "copy loop" if tile == 1 else f"tiles of {tile}"
            t = list(times.values())
            print(f"| {shape} | {N} | {t[0]:.0f} | {t[1]:.0f} ({tiles}) | {t[2]:.0f} | {picked} | "
                  f"{min(t) / times[picked]:.2f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
