"""FP8 vs BF16 training at small scale (V3 report §3.3: relative loss error < 0.25%).

Trains the same model twice on the same batches from the embedded corpus: once with BF16 GEMMs,
once with DeepSeek's FP8 recipe (`ModelConfig.fp8=True`: every linear and the experts' GEMMs in
e4m3 with 1x128 / 128x128 scales and FP32 promotion, FP8 Dgrad and Wgrad). Prints both loss
curves' tails and the relative difference of the final loss, and writes a plot.

    python bench/fp8_training.py --preset small --steps 300      # the issue's setting (GPU-sized)
    python bench/fp8_training.py --gin configs/default.gin --steps 300   # what a 2-core CPU can do
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax import Transformer, preset  # noqa: E402
from dsv3_jax.data import DataConfig, make_data  # noqa: E402
from dsv3_jax.train.config import OptimConfig, TrainConfig  # noqa: E402
from dsv3_jax.train.optim import decay_mask, make_optimizer  # noqa: E402
from dsv3_jax.train.state import new_state, split_model  # noqa: E402
from dsv3_jax.train.step import make_train_step  # noqa: E402


def model_config(args):
    if args.gin:
        import gin
        from dsv3_jax.train.main import parse_gin
        parse_gin([args.gin], [])
        cfg = gin.get_configurable("ModelConfig")()
    else:
        cfg = preset(args.preset)
    return cfg.replace(dtype="bfloat16", param_dtype="float32", n_mtp_modules=0)


def run(cfg, batches, steps, optim):
    graphdef, params, biases = split_model(nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))())
    tx = make_optimizer(optim, decay_mask(params))
    state = new_state(params, biases, tx)
    step = jax.jit(make_train_step(graphdef, tx, TrainConfig(batch_size=batches[0]["inputs"].shape[0],
                                                             seq_len=batches[0]["inputs"].shape[1]),
                                   cfg.n_moe_layers), donate_argnums=0)
    losses, t0 = [], time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[i], 0.001, 0.0)
        losses.append(float(m["loss"]))
    return np.array(losses), time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--gin", default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/fp8_training")
    p.add_argument("--plot", default="docs/fp8_training.png")
    p.add_argument("--peak-lr", type=float, default=1.5e-3)
    p.add_argument("--bf16-runs", type=int, default=1,
                   help="train BF16 this many times: on a GPU (nondeterministic reductions) the "
                        "spread between identical runs is the noise floor of the comparison")
    p.add_argument("--fp8-kernels", default="auto",
                   help="comma-separated ModelConfig.fp8_kernel values, one FP8 run each "
                        "(e.g. auto,reference: the GPU kernel's FP22 accumulation vs exact FP32)")
    args = p.parse_args()
    cfg = model_config(args)
    data = make_data(DataConfig(), seq_len=args.seq, global_batch_size=args.batch, vocab_size=cfg.vocab_size,
                     workdir=args.workdir)
    batches = [next(data.train) for _ in range(args.steps)]
    optim = OptimConfig(peak_lr=args.peak_lr, final_lr=args.peak_lr / 10, warmup_steps=args.steps // 5,
                        decay_steps=args.steps)
    kernels = args.fp8_kernels.split(",")
    for k in kernels:
        cfg.replace(fp8_kernel=k)  # validates the name before any training
    bf16_runs = [run(cfg, batches, args.steps, optim) for _ in range(args.bf16_runs)]
    (bf16, t_bf16) = bf16_runs[0]
    fp8 = {k: run(cfg.replace(fp8=True, fp8_kernel=k), batches, args.steps, optim) for k in kernels}
    tail = max(args.steps // 10, 1)
    a = bf16[-tail:].mean()
    print(f"model: dim={cfg.dim} layers={cfg.n_layers} experts={cfg.n_routed_experts} vocab={cfg.vocab_size}; "
          f"{args.steps} steps x {args.batch}x{args.seq} tokens; device {jax.devices()[0].device_kind}")
    print(f"| run | final loss (mean of last {tail}) | relative difference vs BF16 | time |")
    print("|---|---|---|---|")
    print(f"| BF16 | {a:.4f} | | {t_bf16:.0f} s |")
    for i, (losses, t) in enumerate(bf16_runs[1:], 2):
        b = losses[-tail:].mean()
        print(f"| BF16 again (run {i}) | {b:.4f} | {(b - a) / a * 100:+.3f}% | {t:.0f} s |")
    for k, (losses, t) in fp8.items():
        b = losses[-tail:].mean()
        print(f"| FP8 (fp8_kernel={k}) | {b:.4f} | {(b - a) / a * 100:+.3f}% | {t:.0f} s |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.figure(figsize=(6, 3.5))
        for i, (losses, _) in enumerate(bf16_runs):
            plt.plot(losses, label="BF16" + (f" (run {i + 1})" if i else ""), lw=1)
        for k, (losses, _) in fp8.items():
            plt.plot(losses, label=f"FP8 (1x128 / 128x128, FP32 promotion; {k})", lw=1)
        plt.xlabel("step"), plt.ylabel("train loss"), plt.legend(), plt.tight_layout()
        plt.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
