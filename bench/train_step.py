"""Training-step throughput of a preset on this machine, against this machine's own matmul FLOP/s.

    python bench/train_step.py                   # the `small` preset (~100M parameters), batch 4 x 256
    python bench/train_step.py --preset tiny --batch 8 --seq 128
    python bench/train_step.py --profile 3      # then the XLA ops of 3 more steps, by time

Prints tokens/s, achieved model FLOP/s (6 x activated matmul params + attention, per token, from
the config) and the ratio to a large float32 matmul's FLOP/s measured in the same run (the
achievable peak of this device), i.e. the MFU against a same-run baseline.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax import Transformer, preset  # noqa: E402
from dsv3_jax.train.config import TrainConfig  # noqa: E402
from dsv3_jax.flops import flops_per_token, measure_peak_flops  # noqa: E402
from dsv3_jax.train.state import new_state, split_model  # noqa: E402
from dsv3_jax.train.step import make_train_step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--moe_impl", default="tiled", help="tiled is the fast dropless form on XLA:CPU")
    p.add_argument("--remat", default="none", help="ModelConfig.remat: the layers' rematerialisation policy")
    p.add_argument("--profile", type=int, default=0, help="then trace this many steps and print the top XLA ops")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    cfg = preset(args.preset, moe_impl=args.moe_impl, remat=args.remat)
    graphdef, params, biases = split_model(nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))())
    tx = optax.adamw(1e-4)
    state = new_state(params, biases, tx)
    step = jax.jit(make_train_step(graphdef, tx, TrainConfig(batch_size=args.batch, seq_len=args.seq),
                                   cfg.n_moe_layers), donate_argnums=0)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    t0 = time.perf_counter()
    state, m = step(state, batch, 1e-3, 0.3)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, batch, 1e-3, 0.3)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.batch * args.seq / dt
    fpt = flops_per_token(cfg, args.seq)
    peak = measure_peak_flops(jnp.float32, n=1024)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"preset {args.preset} ({n_params / 1e6:.1f}M params, moe_impl={args.moe_impl}), batch {args.batch} x "
          f"{args.seq}, device {jax.devices()[0].device_kind} x {jax.device_count()}")
    print("| step time | tokens/s | model GFLOP/token | achieved GFLOP/s | matmul GFLOP/s (same run) | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| {dt * 1e3:.0f} ms | {tok_s:.0f} | {fpt / 1e9:.3f} | {tok_s * fpt / 1e9:.1f} | {peak / 1e9:.1f} | "
          f"{tok_s * fpt / peak:.3f} |")
    print(f"(first step incl. compile: {compile_s:.1f} s)")
    if args.profile:
        sys.path.insert(0, os.path.dirname(__file__))
        import xla_ops
        hlo = step.lower(state, batch, 1e-3, 0.3).compile().as_text()

        def one_step():
            nonlocal state
            state, m = step(state, batch, 1e-3, 0.3)
            return m

        print(xla_ops.profile(one_step, args.profile, hlo, args.top))
        print(f"AdamW update alone (every parameter, donated): {1e3 * adamw_s(tx, state['params']):.0f} ms")


def adamw_s(tx, params, n: int = 5) -> float:
    """Seconds per optimizer update on its own, with stand-in gradients: the step's share that is
    neither forward nor backward."""
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt, grads):
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    params = jax.tree.map(jnp.copy, params)
    opt, grads = tx.init(params), jax.tree.map(lambda p: 0.01 * p, params)
    params, opt = jax.block_until_ready(update(params, opt, grads))
    t0 = time.perf_counter()
    for _ in range(n):
        params, opt = update(params, opt, grads)
    jax.block_until_ready(params)
    return (time.perf_counter() - t0) / n


if __name__ == "__main__":
    main()
