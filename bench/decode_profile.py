"""Where a decode step spends its time: the step timed alone, then a `jax.profiler` trace of it with
the XLA ops that take the most time per step.

The model, prompts and engine are bench/decode.py's (10.5M parameters, float32, layers unstacked,
bf16 latent cache; --moe_impl tiled, the fast form on XLA:CPU, or ragged for GPUs). --draft 1 profiles the MTP speculative step (verification
of one draft plus the next draft).

    python bench/decode_profile.py                       # batch 1, plain step
    python bench/decode_profile.py --draft 1 --batch 8 --top 30
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.infer import Engine, programs  # noqa: E402
from dsv3_jax.infer.engine import _Run  # noqa: E402
from dsv3_jax.infer.sampling import SamplingConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128, help="prompt tokens already in the cache")
    p.add_argument("--draft", type=int, default=0, choices=[0, 1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--model", choices=["bench", "large"], default="bench", help="bench/decode.py's models")
    p.add_argument("--moe_impl", choices=["tiled", "ragged", "dense"], default="tiled")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    import decode as bench  # bench/decode.py: the model
    import xla_ops

    cfg = bench.MODELS[args.model]
    model = bench.bench_model(cfg.replace(moe_impl=args.moe_impl), bench.default_init_std(cfg))
    engine, B, A = Engine(model), args.batch, args.draft
    prompts = np.random.default_rng(0).integers(3, model.cfg.vocab_size, (B, args.context)).tolist()
    T = args.context + 4 * args.steps * (A + 1) + 64
    run = _Run(engine, prompts, [T] * B, args.context, T, jax.random.key(0), np.int32(-1), A, SamplingConfig(), None, 1)
    state, rows = run.prefill(list(range(B)), B), SamplingConfig().rows(B)
    kv_len = programs.kv_len_for(args.context + 2 * args.steps * (A + 1) + 2, T)

    def steps(n):
        nonlocal state
        for _ in range(n):
            state, out = programs.step(engine.model_def, engine.decode_params, state, run.key, run.eos, n_draft=A,
                                       sampling=rows, kv_len=kv_len)
            jax.block_until_ready(out)

    steps(3)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        steps(1)
        times.append(time.perf_counter() - t)
    print(f"batch {B}, context {args.context}, draft {A}: step {1e3 * np.median(times):.2f} ms median "
          f"(p10 {1e3 * np.percentile(times, 10):.2f}), load average {os.getloadavg()[0]:.1f}")
    hlo = programs.step.lower(engine.model_def, engine.decode_params, state, run.key, run.eos, n_draft=A,
                              sampling=rows, kv_len=kv_len).compile().as_text()

    def one_step():
        steps(1)
        return state

    print(xla_ops.profile(one_step, args.steps // 2, hlo, args.top))


if __name__ == "__main__":
    main()
