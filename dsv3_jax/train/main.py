"""Train a DeepSeek-V3-style MoE model (the `dsv3-train` command; `train.py` calls this).

    dsv3-train --gin_file configs/tiny.gin --workdir /tmp/run [--gin_bindings 'train.num_steps=20']

Re-running the same command resumes from the newest checkpoint in WORKDIR/checkpoints. The run writes
WORKDIR/config.gin (the operative config), metrics.jsonl, TensorBoard events under tb/, and ends
with a short greedy sample from the trained model.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dsv3_jax.checkpoint import Checkpointer, abstract_like
from dsv3_jax.config import ModelConfig
from dsv3_jax.data import DataConfig, make_data
from dsv3_jax.errors import ConfigError, UserError
from dsv3_jax.flops import flops_per_token, measure_peak_flops, mfu
from dsv3_jax.infer.engine import generate
from dsv3_jax.parallel import multihost, xla_flags
from dsv3_jax.sharding import batch_sharding, make_mesh
from dsv3_jax.train import dryrun, layout
from dsv3_jax.train.config import MeshConfig, OptimConfig, TrainConfig
from dsv3_jax.train.metrics import MetricsWriter
from dsv3_jax.train.optim import lr_schedule
from dsv3_jax.train.preemption import PreemptionGuard
from dsv3_jax.train.state import init_state
from dsv3_jax.train.step import make_eval_step


# ---- command line and devices (before anything starts a JAX backend) ----------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dsv3-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable, later wins)")
    p.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, config")
    p.add_argument("--num_cpu_devices", type=int, default=None, help="fake CPU devices (tests, dry runs)")
    p.add_argument("--dry_run", action="store_true",
                   help="compile one step for the mesh without allocating the model; print per-device "
                        "memory and the bytes each collective moves")
    p.add_argument("--coordinator_address", default=None, help="multi-process: host:port of process 0")
    p.add_argument("--num_processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-process: this process's index")
    p.add_argument("--distributed_timeout", type=int, default=300, help="multi-process start-up timeout (s)")
    return p.parse_args(argv)


def setup_devices(args) -> None:
    """Fake CPU devices, the GPU overlap flags and multi-process start-up: all read when the backend
    starts, so this runs first."""
    if args.num_cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.num_cpu_devices}")
    if xla_flags.gpu_requested():
        xla_flags.set_gpu_xla_flags()  # latency-hiding scheduler: overlap the EP all-to-all with compute
    multihost.initialize(args.coordinator_address, args.num_processes, args.process_id, args.distributed_timeout)


# ---- config: gin binds the frozen dataclasses and `train` (model size -> run -> overlay) ---------
CONFIGURABLES = (ModelConfig, MeshConfig, OptimConfig, TrainConfig, DataConfig)


def parse_gin(files, bindings):
    """Register the configurables and parse gin files and bindings; typos, unknown names and
    syntax errors become one ConfigError."""
    for cls in CONFIGURABLES:
        gin.external_configurable(cls, name=cls.__name__)
    gin.external_configurable(train, name="train")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False, skip_unknown=False)
    except (ValueError, KeyError, OSError, SyntaxError) as e:
        raise ConfigError(f"gin config: {e}") from None


def configured_train(workdir: str, dry_run: bool):
    """Call `train` with its gin bindings; a missing required value is a ConfigError."""
    try:
        bound = gin.get_configurable("train")
        return bound(workdir, dry_run=dry_run)
    except RuntimeError as e:
        if "Required bindings" not in str(e):  # gin's missing-value error; anything else is a bug
            raise
        raise ConfigError(str(e).splitlines()[0]) from None


# ---- the run --------------------------------------------------------------------------------------
def train(workdir: str, num_steps: int = gin.REQUIRED, model: ModelConfig = gin.REQUIRED,
          run: TrainConfig = gin.REQUIRED, mesh: MeshConfig = gin.REQUIRED,
          optim: OptimConfig = gin.REQUIRED, data: DataConfig = gin.REQUIRED, dry_run: bool = False):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    warning = layout.check_layout(model, run, mesh, jax.device_count())
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    # ---- mesh ----
    mesh_ = make_mesh(mesh.data, mesh.pipeline, mesh.expert)
    jax.set_mesh(mesh_)  # the ambient mesh: moe_impl="ep" opens its shard_map over it
    if dry_run:
        print(dryrun.format_report(dryrun.report(model, run, optim, mesh_), run.batch_size * run.seq_len))
        return None

    # ---- data, init (sharded by the logical-axis rules), restore ----
    in_sh = batch_sharding(mesh_, (run.batch_size, run.seq_len))
    share, n_shares = multihost.batch_share(in_sh, (run.batch_size, run.seq_len))  # this process's rows
    ds = make_data(data, seq_len=run.seq_len, global_batch_size=run.batch_size, vocab_size=model.vocab_size,
                   workdir=workdir, process_index=share, process_count=n_shares)
    graphdef, tx, state, state_sh = init_state(model, optim, mesh_, run.seed)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=run.checkpoint_every,
                        keep=run.keep_checkpoints)
    start, state = restore(ckpt, state, ds, workdir)

    # ---- step ----
    # Fixed in/out shardings: the state's layout never changes, so the step compiles once.
    step_fn = jax.jit(layout.make_step(graphdef, tx, run, model, mesh_), donate_argnums=0,
                      in_shardings=(state_sh, in_sh, None, None), out_shardings=(state_sh, None))
    eval_fn = jax.jit(make_eval_step(graphdef), in_shardings=(state_sh, in_sh))

    def put(b):
        return {k: jax.make_array_from_process_local_data(in_sh, v, (run.batch_size, *v.shape[1:]))
                for k, v in b.items()}

    state, rec = loop(state, step_fn, eval_fn, put, ds, ckpt, workdir, start, num_steps, model, run, mesh, optim)
    if "val_loss" in rec and ds.unigram_val_loss is not None:
        print(f"validation loss {rec['val_loss']:.3f} nats vs unigram baseline {ds.unigram_val_loss:.3f}",
              file=sys.stderr)
    sample(graphdef, state, ds.tokenizer, run)
    return state


def restore(ckpt: Checkpointer, state, ds, workdir: str):
    """-> (start step, state): the newest readable checkpoint, read straight into `state`'s layout."""
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is None:
        return 0, state
    start, state, data_state, _ = restored
    ds.set_state(data_state)
    print(f"resumed from step {start} in {workdir}", file=sys.stderr)
    return start, state


def loop(state, step_fn, eval_fn, put, ds, ckpt, workdir, start, num_steps, model, run, mesh, optim):
    """Steps start..num_steps with metrics, evaluation and checkpoints; SIGTERM/SIGINT save and stop.
    -> (state, the last step's metrics record)."""
    writer = MetricsWriter(workdir, resume_step=start if start else None)
    schedule = lr_schedule(optim)
    tokens_per_step = run.batch_size * run.seq_len
    fpt, peak = flops_per_token(model, run.seq_len), measure_peak_flops(jnp.dtype(model.dtype))
    meta = {"model": dataclasses.asdict(model), "run": dataclasses.asdict(run), "mesh": dataclasses.asdict(mesh)}
    rec = {}
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc="train", dynamic_ncols=True,
               disable=None)
    with PreemptionGuard() as guard:
        for step in bar:
            batch = put(next(ds.train))
            t0 = time.perf_counter()
            state, m = step_fn(state, batch, run.gamma_at(step), run.mtp_lambda_at(step))
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            rec = {"lr": float(schedule(step)), "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
            rec.update({k: v.tolist() if np.ndim(v) else float(v) for k, v in m.items()})
            rec["mfu"] = mfu(rec["tokens_per_s"], fpt, peak, jax.device_count())
            if (step + 1) % run.eval_every == 0 or step + 1 == num_steps:
                vals = [jax.device_get(eval_fn(state, put(b)))
                        for b in itertools.islice(ds.val_batches(), run.eval_batches)]
                rec.update({k: float(np.mean([v[k] for v in vals])) for k in vals[0]})
            if (step + 1) % run.log_every == 0:
                writer.write(step + 1, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            stop = guard.should_stop()
            ckpt.save(step + 1, state, data_state=ds.get_state(), meta=meta, force=stop or step + 1 == num_steps)
            if stop:
                print(f"signal received: saved step {step + 1}, exiting", file=sys.stderr)
                break
    ckpt.wait()
    ckpt.close()
    writer.close()
    return state, rec


def sample(graphdef, state, tokenizer, run: TrainConfig) -> None:
    """A short greedy continuation through the inference engine's latent-cache decoder."""
    if tokenizer is None or not run.sample_tokens:
        return
    prompt = tokenizer.encode(run.sample_prompt) or [tokenizer.eos_id]
    res = generate(nnx.merge(graphdef, state["params"], state["biases"]), [prompt],
                   max_new_tokens=run.sample_tokens, cache_dtype=jnp.float32)
    print("\n--- sample (greedy) ---\n" + tokenizer.decode(prompt + res.tokens[0]) + "\n---")


# ---- entry point: the project's own errors are one line; anything else keeps its traceback ------
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_devices(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parse_gin(args.gin_file, args.gin_bindings)
        configured_train(args.workdir, args.dry_run)
    except UserError as e:  # gin appends "In call to configurable ..." lines: the message says enough
        lines = [ln for ln in str(e).splitlines() if not ln.strip().startswith("In call to configurable")]
        print("error: " + "\n".join(lines), file=sys.stderr)
        return 2
    return 0

