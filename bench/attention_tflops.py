"""Attention throughput per implementation at DeepSeek-V3's head dims: TFLOP/s of the forward and of
forward + backward, each implementation checked against the first one in the same run.

V3's expanded MLA form (Dk = 192 for queries and keys, Dv = 128 for values, the YaRN softmax
scale), causal, training-shaped (queries and keys at 0..S-1), every implementation called through
the model's one seam (`dsv3_jax.attention.attention(..., impl=)`). FLOPs are the causal model
FLOPs: per head and (query, visible key) pair 2 (Dk + Dv) forward (QK^T, PV) and 4 (Dk + Dv)
backward (dV, dP, dQ, dK), no recomputation counted, S (S + 1) / 2 visible pairs per head. A
kernel that computes the masked half anyway shows up as lower TFLOP/s, not as more work.

The GPU run of issue 12 (`bash bench/gpu_session.sh attention`):
    python bench/attention_tflops.py --impls tokamax cudnn blockwise --seq 4096 8192 --heads 128
On a CPU (a check of the script itself; the reference holds [B,H,S,S] float32 scores):
    python bench/attention_tflops.py --impls reference blockwise --seq 512 --heads 2 --dtype float32
An implementation that cannot run here (tokamax not installed, cuDNN on a CPU) prints why and is
left out.
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
from dsv3_jax.attention import IMPLS, attention  # noqa: E402
from prefill import timed  # noqa: E402  (bench/prefill.py: the median of warm runs)


def programs(impl: str, mask, scale: float):
    """-> (forward, forward + backward) jitted on (q, k, v); the backward is d/d(q, k, v) of sum(out * g)
    for a fixed random g (so that no gradient is trivially structured)."""
    def fwd(q, k, v):
        return attention(q, k, v, mask, scale=scale, impl=impl)

    def fwd_bwd(q, k, v, g):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, vjp(g)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def rel_diff(got, want) -> float:
    """Largest |got - want| over each array, relative to that array's largest |want| (float32)."""
    return max(float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max()
                     / jnp.abs(w.astype(jnp.float32)).max())
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", nargs="+", default=["tokamax", "cudnn", "blockwise"], choices=IMPLS)
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--heads", type=int, default=128, help="V3 has 128")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    cfg = preset("v3_671b")
    B, H, Dk, Dv, scale = args.batch, args.heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.softmax_scale
    dt = jnp.dtype(args.dtype)
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} jax={jax.__version__} "
          f"B={B} H={H} Dk={Dk} Dv={Dv} {args.dtype}, causal")
    print("| S | impl | forward ms | forward TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | max rel diff vs first |")
    print("|---|---|---|---|---|---|---|")
    for S in args.seq:
        rng = np.random.default_rng(S)
        q, k, v, g = (jnp.asarray(rng.standard_normal(shape, np.float32), dt)
                      for shape in ((B, S, H, Dk), (B, S, H, Dk), (B, S, H, Dv), (B, S, H, Dv)))
        pos = np.arange(S)
        mask = jnp.asarray(np.broadcast_to(pos[None, :] <= pos[:, None], (B, S, S)))
        pairs = B * H * S * (S + 1) / 2
        flops_fwd, flops_all = 2 * (Dk + Dv) * pairs, 6 * (Dk + Dv) * pairs
        first = None
        for impl in args.impls:
            fwd, fwd_bwd = programs(impl, mask, scale)
            try:
                result = jax.block_until_ready(fwd_bwd(q, k, v, g))
            except Exception as e:  # noqa: BLE001 - an implementation this machine lacks: say why, go on
                print(f"| {S} | {impl} | unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]} | - | - | - | - |")
                continue
            t_fwd = timed(fwd, q, k, v, repeats=args.repeats)
            t_all = timed(fwd_bwd, q, k, v, g, repeats=args.repeats)
            diff = "-" if first is None else f"{rel_diff(result, first):.1e}"
            first = result if first is None else first
            print(f"| {S} | {impl} | {1e3 * t_fwd:.2f} | {flops_fwd / t_fwd / 1e12:.3g} | {1e3 * t_all:.2f} | "
                  f"{flops_all / t_all / 1e12:.3g} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
