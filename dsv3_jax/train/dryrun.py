"""`train.py --dry_run`: compile one training step for a mesh without allocating the model.

Everything is abstract: the model comes from `nnx.eval_shape`, the optimizer state from
`jax.eval_shape(tx.init)`, and the step is `jax.jit(step).lower(ShapeDtypeStructs with
shardings).compile()` on the devices jax sees (fake CPU devices: `--num_cpu_devices N`). The report
gives, per device: parameters, biases and optimizer state (from their shardings), XLA's memory
analysis of the compiled step (arguments, outputs, temporaries = activations and workspace), and
the bytes each kind of collective moves per step (`train.hlo.collective_bytes`; for a pipeline,
the collectives inside its per-tick slot branches are weighted by how often the schedule takes each
branch, `pipeline.slot_weights`, with the every-branch-every-tick upper bound beside them; a stage's
spare slots are counted as if they ran).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.sharding import abstract_with, batch_sharding, per_device_bytes
from dsv3_jax.train import hlo, layout, pipeline
from dsv3_jax.train.config import OptimConfig, TrainConfig
from dsv3_jax.train.state import abstract_state


def compile_step(model: ModelConfig, run: TrainConfig, optim: OptimConfig, mesh, compiler_options=None):
    """-> (compiled step, abstract state with shardings). Allocates nothing of the model's size."""
    graphdef, tx, state = abstract_state(model, optim, run.seed, layout.stage_layout(model, run, mesh))
    sh = layout.state_shardings(state, mesh, model)
    state = abstract_with(state, sh)
    in_sh = batch_sharding(mesh, (run.batch_size, run.seq_len))
    tok = jax.ShapeDtypeStruct((run.batch_size, run.seq_len), jnp.int32, sharding=in_sh)
    step = jax.jit(layout.make_step(graphdef, tx, run, model, mesh), donate_argnums=0,
                   in_shardings=(sh, in_sh, None, None), out_shardings=(sh, None))
    with jax.set_mesh(mesh):
        lowered = step.lower(state, {"inputs": tok, "targets": tok}, 1e-3, 0.3)
        return lowered.compile(compiler_options), state


def report(model: ModelConfig, run: TrainConfig, optim: OptimConfig, mesh, compiler_options=None) -> dict:
    t0 = time.perf_counter()
    compiled, state = compile_step(model, run, optim, mesh, compiler_options)
    mem = compiled.memory_analysis()
    busy, weights, stash = 1.0, None, None  # a pipeline's slot conditionals run their collectives on some ticks
    if layout.pipelined(mesh, model):
        N, M = mesh.shape[pipeline.PIPE], pipeline.resolve_microbatches(run.pipeline_microbatches, run.batch_size, mesh)
        ticks = pipeline.schedule_table(run.pipeline_schedule, N, M).shape[1]
        busy = pipeline.CHUNKS[run.pipeline_schedule] * M / ticks
        weights = pipeline.slot_weights(run.pipeline_schedule, N, M)
        stash = pipeline.stash_slots(run.pipeline_schedule, N, M)
        if stash is not None:  # each entry one micro-batch's stage input [rows, S, D] on this device
            rows = run.batch_size // (math.prod(mesh.shape.values()) // N) // M
            stash["bytes"] = (stash["act"] + stash["grad"]) * rows * run.seq_len * model.dim * jnp.dtype(model.dtype).itemsize
    text = compiled.as_text()
    return {
        "mesh": dict(mesh.shape),
        "compile_s": time.perf_counter() - t0,
        "params": per_device_bytes(state["params"]),
        "biases": per_device_bytes(state["biases"]),
        "opt": per_device_bytes(state["opt"]),
        "xla": {k: getattr(mem, k + "_size_in_bytes", None) for k in ("argument", "output", "alias", "temp")},
        "collectives": hlo.collective_bytes(text, weights),
        "collectives_upper": hlo.collective_bytes(text),
        "busy": busy,
        "stash": stash,
    }


def total_bytes(r: dict) -> int:
    """What one device must hold at the step's peak: its arguments (the state and the batch), XLA's
    temporaries, and the outputs that do not reuse a donated argument's buffer."""
    x = r["xla"]
    return x["argument"] + x["temp"] + x["output"] - x["alias"]


def format_report(r: dict, tokens_per_step: int) -> str:
    fb = hlo.format_bytes
    lines = [f"dry run: mesh {r['mesh']} ({math.prod(r['mesh'].values())} devices), compiled in {r['compile_s']:.0f} s",
             "per device:",
             f"  parameters          {fb(r['params'])}",
             f"  router biases       {fb(r['biases'])}",
             f"  optimizer (ZeRO-1)  {fb(r['opt'])}"]
    x = r["xla"]
    lines += [f"  XLA arguments       {fb(x['argument'])}  (state + batch)",
              f"  XLA temporaries     {fb(x['temp'])}  (activations, gradients, workspace)"]
    if r.get("stash"):  # the activations a pipeline keeps between ticks, and its gradient sum
        st = r["stash"]
        lines += [f"    of which: pipeline stash {fb(st['bytes'])} ({st['act']} stage inputs + {st['grad']} "
                  f"output gradients), gradient sum {fb(r['params'])} (parameter-sized)"]
    lines += [f"  XLA outputs         {fb(x['output'])}  (aliased with donated inputs: {fb(x['alias'])})",
              f"per-device total: {total_bytes(r) / 2**30:.2f} GiB  (arguments + temporaries + outputs not "
              "aliased with a donated input)",
              f"collectives per step and device ({tokens_per_step} tokens per step; "
              f"pipeline slots busy {r['busy']:.2f} of ticks; upper bound: every slot busy):"]
    for op, c in sorted(r["collectives"].items()):
        up = r["collectives_upper"][op]
        lines.append(f"  {op:20s} {c['count']:8.1f} x  {fb(c['bytes']):>10s}   (upper bound {fb(up['bytes'])}; "
                     f"as the CPU executable moves them {fb(c['cpu_bytes'])})")
    return "\n".join(lines)
