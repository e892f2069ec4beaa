"""Prefill attention: expanded (MHA form, the engine's prefill) vs absorbed (decode's form).

One MLA layer with DeepSeek-V3's attention dims (kv_lora_rank 512, q_lora_rank 1536, nope 128,
rope 64, v 128) but 16 heads instead of 128 and dim 1024 (a CPU-sized slice: both forms scale
linearly in heads), prefilling one prompt of S tokens into an empty latent cache of S slots.
Both forms write the same cache and give the same output (checked here and in
tests/test_mla.py); absorbed attends in C + R = 576 / C = 512 dims per head, expanded in
Z + R = 192 / O = 128 after expanding the S latents once, so expanded should win once S is
large enough for attention to outweigh the projections.

    python bench/prefill.py                 # S in {256, 1024, 2048}
    python bench/prefill.py --seq 512 --heads 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax import preset  # noqa: E402
from dsv3_jax.cache import LatentCache  # noqa: E402
from dsv3_jax.context import make_context  # noqa: E402
from dsv3_jax.mla import MLA  # noqa: E402


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cfg = preset("v3_671b").replace(dim=1024, n_heads=args.heads, dtype="float32", param_dtype="float32")
    mla = MLA(cfg, rngs=nnx.Rngs(0))
    print(f"backend={jax.default_backend()} heads={cfg.n_heads} C={cfg.kv_lora_rank} "
          f"Z={cfg.qk_nope_head_dim} R={cfg.qk_rope_head_dim} O={cfg.v_head_dim}, batch 1, float32")
    print(f"{'S':>6}{'absorbed ms':>13}{'expanded ms':>13}{'absorbed/expanded':>19}{'max |diff|':>12}")
    for S in args.seq:
        x = jax.random.normal(jax.random.key(S), (1, S, cfg.dim), jnp.float32)
        pos = jnp.arange(S, dtype=jnp.int32)[None]
        empty = LatentCache(jnp.zeros((1, 1, S, cfg.kv_lora_rank)), jnp.zeros((1, 1, S, cfg.qk_rope_head_dim)))
        run = {form: nnx.jit(lambda m, x, c, s, form=form: m(x, make_context(cfg, pos, s), c, 0, form=form)[0],
                             static_argnums=3)
               for form in ("absorbed", "expanded")}
        diff = float(np.abs(np.asarray(run["absorbed"](mla, x, empty, S))
                            - np.asarray(run["expanded"](mla, x, empty, S))).max())
        t = {name: timed(f, mla, x, empty, S, repeats=args.repeats) for name, f in run.items()}
        print(f"{S:>6}{1e3 * t['absorbed']:>13.1f}{1e3 * t['expanded']:>13.1f}"
              f"{t['absorbed'] / t['expanded']:>19.2f}{diff:>12.1e}", flush=True)


if __name__ == "__main__":
    main()
