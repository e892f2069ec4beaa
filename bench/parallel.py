"""Parallelism benchmark on 8 fake CPU devices: step time and tokens/s per mesh layout, the pipeline
bubble per schedule (measured ticks vs formula), and the bytes the EP dispatch/combine moves in
FP32 / BF16 / FP8 / LogFMT (from the compiled HLO) with each format's round-trip error.

    .venv/bin/python bench/parallel.py [--steps 5] [--skip_layouts]

The 8 devices share this machine's cores, so the step times measure the program's overheads
(collectives, pipeline ticks, padding), not a speed-up: a layout cannot run faster than 1 device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.config import ModelConfig, preset  # noqa: E402
from dsv3_jax.model import Transformer  # noqa: E402
from dsv3_jax.moe import route  # noqa: E402
from dsv3_jax.parallel import wire  # noqa: E402
from dsv3_jax.train import hlo, layout, pipeline  # noqa: E402
from dsv3_jax.parallel.ep import moe_ep  # noqa: E402
from dsv3_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from dsv3_jax.train.config import OptimConfig, TrainConfig  # noqa: E402
from dsv3_jax.train.optim import decay_mask, make_optimizer  # noqa: E402
from dsv3_jax.train.state import new_state, split_model  # noqa: E402
from dsv3_jax.train.step import make_train_step  # noqa: E402

LAYOUTS = [((1, 1, 1), "-"), ((8, 1, 1), "-"), ((1, 1, 8), "-"), ((2, 1, 4), "-"),
           ((1, 2, 4), "gpipe"), ((1, 2, 4), "1f1b"), ((2, 2, 2), "1f1b"), ((1, 4, 2), "gpipe"),
           ((1, 4, 2), "1f1b")]


def bench_layouts(steps: int, batch: int, seq: int, micro: int):
    cfg = preset("tiny", n_layers=5, vocab_size=512, max_seq_len=seq)
    rows = []
    for shape, schedule in LAYOUTS:
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = make_mesh(*shape, devices=devices)
        c = cfg if shape == (1, 1, 1) else cfg.replace(moe_impl="ep")  # FP8 dispatch, BF16 combine
        run = TrainConfig(batch_size=batch, seq_len=seq, pipeline_schedule=schedule if schedule != "-" else "1f1b",
                          pipeline_microbatches=micro)
        graphdef, params, biases = split_model(Transformer(c, rngs=nnx.Rngs(0)))
        tx = make_optimizer(OptimConfig(warmup_steps=1), decay_mask(params))
        state = new_state(params, biases, tx)
        sh = layout.state_shardings(state, mesh)
        in_sh = batch_sharding(mesh, (batch, seq))
        fn = layout.make_step(graphdef, tx, run, c, mesh) if shape != (1, 1, 1) else \
            make_train_step(graphdef, tx, run, c.n_moe_layers)
        step = jax.jit(fn, in_shardings=(sh, in_sh, None, None), out_shardings=(sh, None), donate_argnums=0)
        state = jax.device_put(state, sh)
        toks = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, c.vocab_size)
        b = jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, in_sh)
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            compiled = step.lower(state, b, 1e-3, 0.3).compile()
            compile_s = time.perf_counter() - t0
            state, m = compiled(state, b, 1e-3, 0.3)  # warm-up
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = compiled(state, b, 1e-3, 0.3)
            jax.block_until_ready(m)
            dt = (time.perf_counter() - t0) / steps
        coll = hlo.collective_bytes(compiled.as_text())
        rows.append({"mesh": "x".join(map(str, shape)), "schedule": schedule, "compile_s": compile_s, "step_s": dt,
                     "tok_s": batch * seq / dt, "loss": float(m["loss"]),
                     "bubble": float(m.get("pipeline_bubble", 0.0)),
                     "a2a": coll.get("all-to-all", {}).get("bytes", 0), "permute":
                         coll.get("collective-permute", {}).get("bytes", 0),
                     "allreduce": coll.get("all-reduce", {}).get("bytes", 0)})
        print(f"  {rows[-1]['mesh']} {schedule}: {dt * 1e3:.0f} ms/step", file=sys.stderr)
    return rows


def bench_bubbles():
    rows = []
    for P in (2, 4, 8, 16):
        for M in (P, 2 * P, 4 * P):
            g = pipeline.schedule_table("gpipe", P, M)
            f = pipeline.schedule_table("1f1b", P, M)
            busy = f.any(axis=0)
            time_units = (busy[:, 0] * 1 + busy[:, 1] * 2).sum()  # F = 1, B = 2
            rows.append({"P": P, "M": M, "gpipe_ticks": g.shape[1], "gpipe": float(pipeline.bubble(g)),
                         "f1b_ticks": f.shape[1], "f1b_slots": float(pipeline.bubble(f)),
                         "f1b_time": 1 - M * 3 / time_units, "formula": (P - 1) / (M + P - 1),
                         "stash": int(max((f[s, :, 0].cumsum() - f[s, :, 1].cumsum()).max() for s in range(P)))})
    return rows


def bench_wire(D: int = 512, N: int = 256, E: int = 64, ep: int = 8):
    cfg = ModelConfig(dim=D, moe_inter_dim=64, n_routed_experts=E, n_expert_groups=8, n_limited_groups=4,
                      n_activated_experts=8, moe_impl="ep")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N * ep, D)).astype(np.float32))
    w = (jnp.zeros((E, 64, D)), jnp.zeros((E, D, 64)), jnp.zeros((E, 64, D)))
    weights, idx, _ = route(jnp.asarray(rng.normal(size=(N * ep, E)).astype(np.float32)), jnp.zeros(E), cfg)
    mesh = make_mesh(1, 1, ep)
    sample = x[:256, :]
    sample = sample.at[:, :8].multiply(20.0)  # a few outlier channels, as residual activations have
    rows = []
    for dispatch, combine in (("fp32", "fp32"), ("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "logfmt8"),
                              ("fp8", "logfmt10")):
        c = cfg.replace(ep_dispatch=dispatch, ep_combine=combine)
        with jax.set_mesh(mesh):
            text = jax.jit(lambda *a: moe_ep(*a, cfg=c)[0]).lower(x, weights, idx, *w).compile().as_text()
        a2a = hlo.collective_bytes(text)["all-to-all"]["bytes"]
        per_token = {f: wire.wire_bytes((1, 7168), f) for f in (dispatch, combine)}
        err = {f: float(jnp.sqrt(jnp.mean((wire.roundtrip(sample, f) - sample) ** 2) / jnp.mean(sample ** 2)))
               for f in (dispatch, combine)}
        rows.append({"dispatch": dispatch, "combine": combine, "a2a_bytes": a2a,
                     "v3_dispatch_B": per_token[dispatch], "v3_combine_B": per_token[combine],
                     "v3_combine_packed_B": wire.packed_bytes((1, 7168), combine),
                     "err_dispatch": err[dispatch], "err_combine": err[combine]})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--skip_layouts", action="store_true")
    a = p.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cores")
    if not a.skip_layouts:
        print(f"\n### Step time per layout (tiny, 5 layers, batch {a.batch} x {a.seq} tokens, "
              f"{a.microbatches} micro-batches, EP: FP8 dispatch / BF16 combine)\n")
        print("| mesh d x p x e | schedule | compile s | ms/step | tokens/s | bubble | all-to-all B | "
              "permute B | all-reduce B |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in bench_layouts(a.steps, a.batch, a.seq, a.microbatches):
            print(f"| {r['mesh']} | {r['schedule']} | {r['compile_s']:.0f} | {r['step_s'] * 1e3:.0f} | "
                  f"{r['tok_s']:.0f} | {r['bubble']:.3f} | {hlo.format_bytes(r['a2a'])} | "
                  f"{hlo.format_bytes(r['permute'])} | {hlo.format_bytes(r['allreduce'])} |")
    print("\n### Pipeline bubble (measured from the executed tick tables; time model F = 1, B = 2)\n")
    print("| P | M | GPipe ticks | GPipe idle | 1F1B ticks | 1F1B idle slots | 1F1B idle time | "
          "(P-1)/(M+P-1) | 1F1B max stash |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in bench_bubbles():
        print(f"| {r['P']} | {r['M']} | {r['gpipe_ticks']} | {r['gpipe']:.3f} | {r['f1b_ticks']} | "
              f"{r['f1b_slots']:.3f} | {r['f1b_time']:.3f} | {r['formula']:.3f} | {r['stash']} |")
    print("\n### EP wire formats (compiled all-to-all bytes per device per layer: 8 shards, 256 tokens/device, "
          "D=512, top-8 of 64; per-token bytes at D=7168; round-trip RMS error on activations with outliers)\n")
    print("| dispatch | combine | all-to-all bytes | dispatch B/token (7168) | combine B/token (7168) | "
          "combine packed | dispatch rel. err | combine rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in bench_wire():
        print(f"| {r['dispatch']} | {r['combine']} | {hlo.format_bytes(r['a2a_bytes'])} | {r['v3_dispatch_B']} | "
              f"{r['v3_combine_B']} | {r['v3_combine_packed_B']:.0f} | {r['err_dispatch']:.4f} | "
              f"{r['err_combine']:.4f} |")


if __name__ == "__main__":
    main()
