"""Train a DeepSeek-V3-style MoE model.

    python train.py --gin_file configs/tiny.gin --workdir /tmp/run [--gin_bindings 'train.num_steps=20']

Re-running the same command resumes from the newest checkpoint in WORKDIR/checkpoints. The run writes
WORKDIR/config.gin (the operative config), metrics.jsonl, TensorBoard events under tb/, and ends
with a short greedy sample from the trained model.
"""

from __future__ import annotations

import argparse
import itertools
import dataclasses
import json
import logging
import os
import sys
import time

# ---------------------------------------------------------------------------------------------
# Command line. The device count for fake CPU devices must be set before JAX starts its backend.
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.num_cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={ARGS.num_cpu_devices}")

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.data import DataConfig, make_data  # noqa: E402
from dsv3_jax.infer.generate import generate  # noqa: E402
from dsv3_jax.model import Transformer  # noqa: E402
from dsv3_jax.parallel import dryrun, layout, multihost, overlap  # noqa: E402
from dsv3_jax.parallel.pipeline import check_pipeline_layout  # noqa: E402
from dsv3_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from dsv3_jax.train.checkpoint import Checkpointer, CheckpointError, PreemptionGuard, abstract_like  # noqa: E402
from dsv3_jax.train.config import MeshConfig, OptimConfig, TrainConfig  # noqa: E402
from dsv3_jax.flops import flops_per_token, measure_peak_flops, mfu  # noqa: E402
from dsv3_jax.train.metrics import MetricsWriter  # noqa: E402
from dsv3_jax.train.optim import decay_mask, lr_schedule, make_optimizer  # noqa: E402
from dsv3_jax.train.step import make_eval_step, split_model  # noqa: E402

log = logging.getLogger("train")

# ---------------------------------------------------------------------------------------------
# Processes and XLA flags, before anything starts a JAX backend.
if __name__ == "__main__":
    if overlap.gpu_requested():
        overlap.set_gpu_xla_flags()  # latency-hiding scheduler: overlap the EP all-to-all with compute
    multihost.initialize(ARGS.coordinator_address, ARGS.num_processes, ARGS.process_id, ARGS.distributed_timeout)

# ---------------------------------------------------------------------------------------------
# Config: gin binds the frozen dataclasses and the `train` entry point (model size -> run -> overlay).
for _cls in (ModelConfig, MeshConfig, OptimConfig, TrainConfig, DataConfig):
    gin.external_configurable(_cls, name=_cls.__name__)


def parse_gin(files, bindings):
    """Parse gin files and bindings; unknown names and typos raise gin's own error."""
    gin.clear_config()
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False, skip_unknown=False)


def check_layout(model: ModelConfig, run: TrainConfig, mesh: MeshConfig):
    """Clear errors, before anything compiles, for a mesh the model or the batch cannot use."""
    if mesh.size != jax.device_count():
        raise ValueError(f"MeshConfig data={mesh.data} x pipeline={mesh.pipeline} x expert={mesh.expert} "
                         f"= {mesh.size} devices, but jax sees {jax.device_count()}")
    if model.n_routed_experts % mesh.expert:
        raise ValueError(f"MeshConfig.expert={mesh.expert} must divide n_routed_experts={model.n_routed_experts}")
    dp = mesh.data * mesh.expert
    if (run.batch_size // run.grad_accum) % dp:
        raise ValueError(f"TrainConfig.batch_size={run.batch_size} / grad_accum={run.grad_accum} must be "
                         f"divisible by the data-parallel degree data x expert = {dp}")
    if run.seq_len > model.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len={run.seq_len} exceeds ModelConfig.max_seq_len={model.max_seq_len}")
    if mesh.pipeline > 1 and (model.moe_impl == "ep" or mesh.expert == 1):  # the pipelined step
        if run.grad_accum != 1:
            raise ValueError(f"TrainConfig.grad_accum={run.grad_accum}: with MeshConfig.pipeline > 1 the "
                             "pipeline's micro-batches (TrainConfig.pipeline_microbatches) accumulate; use 1")
        check_pipeline_layout(model, mesh.pipeline, run.pipeline_microbatches, run.batch_size // dp, mesh.expert)
    elif mesh.pipeline > 1:
        print(f"warning: MeshConfig.pipeline={mesh.pipeline} with expert={mesh.expert} needs "
              f"ModelConfig.moe_impl='ep' for the pipeline schedules; moe_impl={model.moe_impl!r} runs the "
              "GSPMD step (layers sharded over the pipeline axis, no schedule)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
@gin.configurable
def train(workdir: str, num_steps: int = gin.REQUIRED, model: ModelConfig = gin.REQUIRED,
          run: TrainConfig = gin.REQUIRED, mesh: MeshConfig = gin.REQUIRED,
          optim: OptimConfig = gin.REQUIRED, data: DataConfig = gin.REQUIRED, dry_run: bool = False):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    check_layout(model, run, mesh)

    # ---- mesh and data ----
    mesh_ = make_mesh(mesh.data, mesh.pipeline, mesh.expert)
    jax.set_mesh(mesh_)  # the ambient mesh: moe_impl="ep" opens its shard_map over it
    if dry_run:
        print(dryrun.format_report(dryrun.report(model, run, optim, mesh_), run.batch_size * run.seq_len))
        return None
    in_sh = batch_sharding(mesh_, (run.batch_size, run.seq_len))
    share, n_shares = multihost.batch_share(in_sh, (run.batch_size, run.seq_len))  # this process's rows
    ds = make_data(data, seq_len=run.seq_len, global_batch_size=run.batch_size, vocab_size=model.vocab_size,
                   workdir=workdir, process_index=share, process_count=n_shares)

    # ---- init (sharded by the logical-axis rules), optimizer ----
    abstract = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(run.seed)))
    graphdef, abs_params, abs_biases = split_model(abstract)
    p_sh, b_sh = layout.param_shardings(abs_params, mesh_, model), layout.param_shardings(abs_biases, mesh_, model)
    params, biases = jax.jit(lambda: split_model(Transformer(model, rngs=nnx.Rngs(run.seed)))[1:],
                             out_shardings=(p_sh, b_sh))()
    tx = make_optimizer(optim, decay_mask(abs_params))
    opt_sh = layout.opt_shardings(jax.eval_shape(tx.init, abs_params), mesh_, model)  # ZeRO-1 over data x expert
    replicated = NamedSharding(mesh_, P())
    state = {"params": params, "biases": biases, "opt": jax.jit(tx.init, out_shardings=opt_sh)(params),
             "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
             "rng": jax.device_put(jax.random.key_data(jax.random.key(run.seed)), replicated)}
    # Every leaf gets a NamedSharding on the mesh (optax's init may return single-device ones).
    state_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
    state = jax.device_put(state, state_sh)

    # ---- restore ----
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=run.checkpoint_every,
                        keep=run.keep_checkpoints)
    restored = ckpt.restore_latest(abstract_like(state))
    start = 0
    if restored is not None:
        start, state, data_state, _ = restored
        ds.set_state(data_state)
        print(f"resumed from step {start} in {workdir}", file=sys.stderr)
    writer = MetricsWriter(workdir, resume_step=start if restored is not None else None)

    # ---- step ----
    # Fixed in/out shardings: the state's layout never changes, so the step compiles once.
    step_fn = jax.jit(layout.make_step(graphdef, tx, run, model, mesh_), donate_argnums=0,
                      in_shardings=(state_sh, in_sh, None, None), out_shardings=(state_sh, None))
    eval_fn = jax.jit(make_eval_step(graphdef), in_shardings=(state_sh, in_sh))
    put = lambda b: {k: jax.make_array_from_process_local_data(in_sh, v, (run.batch_size, *v.shape[1:]))  # noqa: E731
                     for k, v in b.items()}
    schedule = lr_schedule(optim)
    tokens_per_step = run.batch_size * run.seq_len
    fpt, peak = flops_per_token(model, run.seq_len), measure_peak_flops(jnp.dtype(model.dtype))
    meta = {"model": dataclasses.asdict(model), "run": dataclasses.asdict(run), "mesh": dataclasses.asdict(mesh)}

    # ---- loop ----
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
    if "val_loss" in rec and ds.unigram_val_loss is not None:
        print(f"validation loss {rec['val_loss']:.3f} nats vs unigram baseline {ds.unigram_val_loss:.3f}",
              file=sys.stderr)

    # ---- sample ----
    if ds.tokenizer is not None and run.sample_tokens:
        prompt = ds.tokenizer.encode(run.sample_prompt) or [ds.tokenizer.eos_id]
        # The inference engine's latent-cache decoder (greedy by default), on the trained weights.
        res = generate(nnx.merge(graphdef, state["params"], state["biases"]), [prompt],
                       max_new_tokens=run.sample_tokens, cache_dtype=jnp.float32)
        print("\n--- sample (greedy) ---\n" + ds.tokenizer.decode(prompt + res.tokens[0]) + "\n---")
    return state


def main():
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parse_gin(ARGS.gin_file, ARGS.gin_bindings)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError, IOError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        train(ARGS.workdir, dry_run=ARGS.dry_run)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:  # e.g. every checkpoint in the workdir is unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if "Required bindings" not in str(e):  # gin's missing-value error; anything else is a bug
            raise
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
