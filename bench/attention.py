"""Blockwise (flash) attention vs the reference: time of one forward + backward, and XLA's temp bytes.

DeepSeek-V3's expanded-form head dims (Dk = Z + R = 192, Dv = O = 128) and softmax scale (YaRN
included), but a few heads and batch 1 so that the reference fits a CPU; a training-shaped causal
mask (queries and keys at 0..S-1). Both sides compute d/d(q, k, v) of sum(out) under one jit. The
reference holds [H,S,T] float32 arrays (scores, probabilities and their gradients); the blockwise
path holds O(S) residuals and one tile. Temp bytes come from the compiled programs'
`memory_analysis()`, so they are reported even where the reference is too big to run: its run is
skipped when one [B,H,S,T] float32 array would pass --max-ref-gib.

    python bench/attention.py                     # S in {1024, 2048, 4096, 8192}, 4 heads
    python bench/attention.py --seq 2048 --heads 8 --block-q 256 --block-kv 256
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax import preset  # noqa: E402
from dsv3_jax.attention import reference_attention  # noqa: E402
from dsv3_jax.flash_attention import FlashTuning, blockwise_attention  # noqa: E402
from prefill import timed  # noqa: E402  (bench/prefill.py: the median of warm runs)

MIB = 2 ** 20


def forward_backward(attn, mask, scale):
    """-> jitted (q, k, v) -> (out, (dq, dk, dv)) of sum(out)."""
    def loss(q, k, v):
        out = attn(q, k, v, mask, scale=scale)
        return out.sum(), out
    return jax.jit(lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1])


def max_rel_diff(got, want) -> float:
    """Largest |got - want| over the output and each gradient, relative to that array's largest |want|."""
    return max(float(jnp.abs(g - w).max() / jnp.abs(w).max())
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="at S <= 2048; fewer (at least 2) above")
    p.add_argument("--block-q", type=int, default=FlashTuning.block_q)
    p.add_argument("--block-kv", type=int, default=FlashTuning.block_kv)
    p.add_argument("--max-ref-gib", type=float, default=0.5,
                   help="skip running the reference when one [B,H,S,T] float32 array passes this")
    args = p.parse_args()
    cfg = preset("v3_671b")
    H, Dk, Dv, scale = args.heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.softmax_scale
    tuning = FlashTuning(args.block_q, args.block_kv)
    blockwise = lambda *a, scale: blockwise_attention(*a, scale=scale, tuning=tuning)  # noqa: E731
    print(f"backend={jax.default_backend()} jax={jax.__version__} B=1 H={H} Dk={Dk} Dv={Dv} "
          f"scale={scale:.5f} float32, causal; blockwise tiles {tuning.block_q}x{tuning.block_kv}")
    print("| S | reference ms | blockwise ms | blockwise / reference | reference temp MiB "
          "| blockwise temp MiB | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for S in args.seq:
        rng = np.random.default_rng(S)
        q, k, v = (jnp.asarray(rng.standard_normal((1, S, H, d), np.float32)) for d in (Dk, Dk, Dv))
        pos = np.arange(S)
        mask = jnp.asarray(pos[None, None, :] <= pos[None, :, None])
        run = {name: forward_backward(fn, mask, scale).lower(q, k, v).compile()
               for name, fn in (("reference", reference_attention), ("blockwise", blockwise))}
        temp = {name: c.memory_analysis().temp_size_in_bytes / MIB for name, c in run.items()}
        repeats = max(2, args.repeats * 2048 // max(S, 2048))
        t_blk = timed(run["blockwise"], q, k, v, repeats=repeats)
        score_gib = H * S * S * 4 / 2 ** 30
        if score_gib > args.max_ref_gib:
            ref_ms = f"skipped ({score_gib:.1f} GiB per score array)"
            ratio = diff = "-"
        else:
            t_ref = timed(run["reference"], q, k, v, repeats=repeats)
            ref_ms, ratio = f"{1e3 * t_ref:.0f}", f"{t_blk / t_ref:.2f}"
            diff = f"{max_rel_diff(run['blockwise'](q, k, v), run['reference'](q, k, v)):.1e}"
        print(f"| {S} | {ref_ms} | {1e3 * t_blk:.0f} | {ratio} | {temp['reference']:.0f} "
              f"| {temp['blockwise']:.1f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
