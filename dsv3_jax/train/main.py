"""Train a DeepSeek-V3-style MoE model (the `dsv3-train` command; `train.py` calls this).

    dsv3-train --gin_file configs/tiny.gin --workdir /tmp/run [--gin_bindings 'train.num_steps=20']

Re-running the same command resumes from the newest checkpoint in WORKDIR/checkpoints. The run writes
WORKDIR/config.gin (the operative config), metrics.jsonl, TensorBoard events under tb/, and ends
with a short greedy sample from the trained model.

Nothing is written into a workdir until the run is known to start. Resuming first compares the
configs the checkpoint was trained with (its `meta` item) with the new ones: a changed architecture
stops with the fields and both values; a changed run (routing, batch, sequence length, optimizer,
data) needs --allow_config_change and is then recorded (a warning, and `config_changes` in the new
checkpoints' meta); the mesh and execution choices change freely (`train/config.py` classes every
field). A workdir with checkpoints keeps its tokenizer; config.gin is written after these checks.

Exit status:
    0    trained to train.num_steps, or already there ("already at step N", nothing done)
    1    a runtime error, named in one line: no readable checkpoint, data or a tokenizer that cannot
         be used, a missing file
    2    a usage error, named in one line: a config value, gin file or binding, a flag, a workdir
         that cannot hold a run, a resume that would change the architecture or (unflagged) the run
    130  stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM (128 + the signal's number): inside the
         training loop after saving the step (the same command resumes from it, and no sample is
         printed); before the first step or after the last, with nothing (more) to save. A second
         Ctrl-C in the loop stops at once without saving.
Errors of the project's own kinds (`dsv3_jax.errors`) are one line on stderr; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import re
import signal
import sys
import time
import tokenize

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dsv3_jax.checkpoint import Checkpointer, abstract_like, latest_meta
from dsv3_jax.config import ModelConfig
from dsv3_jax.data import DataConfig, make_data
from dsv3_jax.errors import ConfigError, UserError
from dsv3_jax.flops import flops_per_token, measure_peak_flops, mfu
from dsv3_jax.infer.engine import generate
from dsv3_jax.parallel import multihost, xla_flags
from dsv3_jax.parallel import stages as st
from dsv3_jax.sharding import abstract_with, batch_sharding, make_mesh
from dsv3_jax.train import dryrun, layout
from dsv3_jax.train.config import MeshConfig, OptimConfig, TrainConfig, config_changes
from dsv3_jax.train.metrics import MetricsWriter
from dsv3_jax.train.optim import lr_schedule
from dsv3_jax.train.preemption import PreemptionGuard, Stopped, exit_status, sigterm_interrupts
from dsv3_jax.train.state import abstract_state, convert_layout, init_state
from dsv3_jax.train.step import make_eval_step


# ---- command line and devices (before anything starts a JAX backend) ----------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dsv3-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable, later wins)")
    p.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, config")
    p.add_argument("--allow_config_change", action="store_true",
                   help="resume although the run config changed (routing, batch, sequence length, "
                        "optimizer, data); the change is recorded. Architecture changes never resume")
    p.add_argument("--num_cpu_devices", type=int, default=None, help="fake CPU devices (tests, dry runs)")
    p.add_argument("--dry_run", action="store_true",
                   help="compile one step for the mesh without allocating the model; print per-device "
                        "memory and the bytes each collective moves")
    p.add_argument("--coordinator_address", default=None, help="multi-process: host:port of process 0")
    p.add_argument("--num_processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-process: this process's index")
    p.add_argument("--distributed_timeout", type=int, default=300, help="multi-process start-up timeout (s)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """The numeric flags argparse only parses: a bad one is a ConfigError, not a crash in XLA."""
    for flag, low in (("num_cpu_devices", 1), ("num_processes", 1), ("process_id", 0), ("distributed_timeout", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise ConfigError(f"--{flag}={value}: expected an integer >= {low}")
    n, i = args.num_processes, args.process_id
    if n is not None and i is not None and i >= n:
        raise ConfigError(f"--process_id={i}: expected < --num_processes={n}")


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
GIN_ERRORS = (ValueError, KeyError, OSError, SyntaxError, tokenize.TokenError)
_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1""", re.MULTILINE)
_GIN_WHERE = re.compile(r"^\s*In (?:file \"(?P<file>[^\"]*)\", line (?P<line>\d+)|bindings string line \d+)\n"
                        r"\s*(?P<text>.*)$", re.MULTILINE)


def parse_gin(files, bindings):
    """Register the configurables and parse gin files and bindings; typos, unknown names, missing
    files and syntax errors become one ConfigError."""
    for cls in CONFIGURABLES:
        gin.external_configurable(cls, name=cls.__name__)
    gin.external_configurable(train, name="train")
    gin.clear_config()
    check_gin_files(files)
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False, skip_unknown=False)
    except GIN_ERRORS as e:
        raise ConfigError(f"gin config: {gin_message(e)}") from None


def check_gin_files(files, included_by: str | None = None, seen: frozenset = frozenset()) -> None:
    """Every gin file and every file it includes exists (include paths are relative to the working
    directory, as gin reads them). gin reports a missing include as a TypeError from its package
    lookup, and a missing file after logging an ERROR line of its own."""
    for f in files:
        if not os.path.isfile(f):
            by = f", included by {included_by!r}," if included_by else ""
            raise ConfigError(f"gin file {f!r}{by} does not exist (paths are relative to {os.getcwd()})")
        if f not in seen:
            with open(f) as fh:
                check_gin_files([m.group(2) for m in _INCLUDE.finditer(fh.read())], f, seen | {f})


def gin_message(e: BaseException) -> str:
    """One line for a gin parse error: what went wrong and where (the binding or file line)."""
    if isinstance(e, tokenize.TokenError):
        return f"{e.args[0]} (an unclosed bracket or quote in a gin file or binding)"
    if isinstance(e, SyntaxError) and e.text:
        where = f"{e.filename} line {e.lineno}" if e.filename else "binding"
        return f"{e.msg.rstrip('.')} in {where}: {e.text.strip()!r}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    where = _GIN_WHERE.search(text)  # the innermost location gin appends: the line at fault
    if where is None:
        return text.splitlines()[0]
    at = f"{where['file']} line {where['line']}" if where["file"] else "binding"
    return f"{text.splitlines()[0].rstrip('.')} in {at}: {where['text'].strip()!r}"


def configured_train(workdir: str, dry_run: bool, allow_config_change: bool = False):
    """Call `train` with its gin bindings; a missing required value is a ConfigError."""
    try:
        bound = gin.get_configurable("train")
        return bound(workdir, dry_run=dry_run, allow_config_change=allow_config_change)
    except RuntimeError as e:
        if "Required bindings" not in str(e):  # gin's missing-value error; anything else is a bug
            raise
        raise ConfigError(str(e).splitlines()[0]) from None


# ---- the run --------------------------------------------------------------------------------------
def train(workdir: str, num_steps: int = gin.REQUIRED, model: ModelConfig = gin.REQUIRED,
          run: TrainConfig = gin.REQUIRED, mesh: MeshConfig = gin.REQUIRED,
          optim: OptimConfig = gin.REQUIRED, data: DataConfig = gin.REQUIRED, dry_run: bool = False,
          allow_config_change: bool = False):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"train.num_steps={num_steps!r}: expected a positive integer")
    warning = layout.check_layout(model, run, mesh, jax.device_count())
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    # ---- the workdir: checked, and compared with its checkpoint, before anything is written ----
    meta = {"model": dataclasses.asdict(model), "run": dataclasses.asdict(run), "mesh": dataclasses.asdict(mesh),
            "optim": dataclasses.asdict(optim), "data": dataclasses.asdict(data)}
    if not dry_run:  # a dry run reads no workdir and writes only its config.gin there
        check_workdir(workdir)
        found, meta = check_resume(workdir, meta, allow_config_change)

    # ---- mesh ----
    mesh_ = make_mesh(mesh.data, mesh.pipeline, mesh.expert)
    jax.set_mesh(mesh_)  # the ambient mesh: moe_impl="ep" opens its shard_map over it
    if dry_run:
        print(dryrun.format_report(dryrun.report(model, run, optim, mesh_), run.batch_size * run.seq_len))
        write_dry_run_config(workdir)
        return None
    os.makedirs(workdir, exist_ok=True)

    # ---- data, init (sharded by the logical-axis rules), restore ----
    in_sh = batch_sharding(mesh_, (run.batch_size, run.seq_len))
    share, n_shares = multihost.batch_share(in_sh, (run.batch_size, run.seq_len))  # this process's rows
    ds = make_data(data, seq_len=run.seq_len, global_batch_size=run.batch_size, vocab_size=model.vocab_size,
                   workdir=workdir, process_index=share, process_count=n_shares,
                   keep_workdir_tokenizer=found is not None)
    stages = layout.stage_layout(model, run, mesh_)  # the pipeline's slot layout of the state, if not the model's
    if stages is not None:
        meta = {**meta, st.META: stages.to_json()}
    graphdef, tx, state, state_sh = init_state(model, optim, mesh_, run.seed, stages)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=run.checkpoint_every,
                        keep=run.keep_checkpoints)
    # verified: a finished run is one whose last step restores
    start, state = restore(ckpt, state, state_sh, ds, stages,
                           lambda saved: abstract_state(model, optim, run.seed, saved)[2])
    if start >= num_steps:
        ckpt.close()
        print(f"already at step {start} (train.num_steps = {num_steps}): nothing to do", file=sys.stderr)
        return None
    if start:
        print(f"resumed from step {start} in {workdir}", file=sys.stderr)
    with open(os.path.join(workdir, "config.gin"), "w") as f:  # the run starts: record its config
        f.write(gin.operative_config_str())

    # ---- step ----
    # Fixed in/out shardings: the state's layout never changes, so the step compiles once.
    step_fn = jax.jit(layout.make_step(graphdef, tx, run, model, mesh_), donate_argnums=0,
                      in_shardings=(state_sh, in_sh, None, None), out_shardings=(state_sh, None))
    eval_fn = None
    if evaluates(ds, run, data):
        eval_fn = jax.jit(make_eval_step(graphdef, stages), in_shardings=(state_sh, in_sh))

    def put(b):
        return {k: jax.make_array_from_process_local_data(in_sh, v, (run.batch_size, *v.shape[1:]))
                for k, v in b.items()}

    state, rec, stopped = loop(state, step_fn, eval_fn, put, ds, ckpt, workdir, start, num_steps, model, run,
                               optim, meta)
    if stopped:
        raise Stopped(*stopped)  # saved; the entry point exits with the signal's status, no sample
    if "val_loss" in rec and ds.unigram_val_loss is not None:
        print(f"validation loss {rec['val_loss']:.3f} nats vs unigram baseline {ds.unigram_val_loss:.3f}",
              file=sys.stderr)
    sample(graphdef, state, ds.tokenizer, run, stages)
    return state


def write_dry_run_config(workdir: str) -> None:
    """The dry run's operative config as WORKDIR/config.gin, unless WORKDIR holds a run (whose
    config.gin describes its checkpoints and stays as it is)."""
    if latest_meta(os.path.join(workdir, "checkpoints")) is not None:
        print(f"{workdir} holds a training run: its config.gin is left as it is", file=sys.stderr)
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())


def check_workdir(workdir: str) -> None:
    """A workdir that cannot hold a run is a usage error, found before anything is written."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {workdir!r} is a file; expected a directory (a new one or a run's)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir {workdir!r}: {existing!r} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir!r}: {existing!r} is not writable")


def check_resume(workdir: str, meta: dict, allow_change: bool) -> tuple[int | None, dict]:
    """-> (the workdir's newest checkpointed step or None, the meta to save with the new checkpoints).

    The checkpoint's configs against the new ones (`train.config.config_changes`): an architecture
    change is a ConfigError; a run change is one too unless `allow_change`, and then it is announced
    and appended to the meta's `config_changes` record."""
    found = latest_meta(os.path.join(workdir, "checkpoints"))
    if found is None:
        return None, meta
    step, saved = found
    if saved is None:  # no readable meta: restore_latest decides what is usable
        return step, meta
    arch, changed = config_changes(saved, meta)
    if arch:
        raise ConfigError(f"{workdir} holds a checkpoint (step {step}) of another architecture: "
                          f"{'; '.join(arch)}; its parameters cannot take the new values: restore them, "
                          f"or use a new --workdir")
    if changed and not allow_change:
        raise ConfigError(f"resuming {workdir} (step {step}) would change the run: {'; '.join(changed)}; "
                          f"pass --allow_config_change to go on with the new values, or restore them")
    history = saved.get("config_changes", [])
    if changed:
        print(f"warning: --allow_config_change: resuming step {step} with {'; '.join(changed)} "
              f"(recorded as config_changes in the checkpoints' meta)", file=sys.stderr)
        history = [*history, {"step": step, "changes": changed}]
    return step, {**meta, "config_changes": history} if history else meta


def evaluates(ds, run: TrainConfig, data: DataConfig) -> bool:
    """Whether the run evaluates at all; if not, it says why, once."""
    if run.eval_batches > 0 and len(ds.val_dataset) > 0:
        return True
    why = ("TrainConfig.eval_batches = 0" if run.eval_batches == 0 else
           f"DataConfig.val_fraction = {data.val_fraction} holds out no validation data")
    print(f"no evaluation: {why}", file=sys.stderr)
    return False


def restore(ckpt: Checkpointer, state, state_sh, ds, stages, abstract_in):
    """-> (start step, state): the newest readable checkpoint, read straight into `state`'s shardings.

    A step saved in another slot layout (another pipeline schedule or stage split: its meta's
    `stage_layout`; `abstract_in(layout)` gives that state's shapes) is read in its own layout on
    this mesh, then moved into `stages` (`state.convert_layout`)."""
    mesh = jax.tree.leaves(state_sh)[0].mesh

    def target(meta):
        saved = st.saved_layout(meta)
        if saved == stages:
            return abstract_like(state)
        abstract = abstract_in(saved)
        return abstract_with(abstract, layout.state_shardings(abstract, mesh))

    restored = ckpt.restore_latest(target)
    if restored is None:
        return 0, state
    start, state, data_state, meta = restored
    saved = st.saved_layout(meta)
    if saved != stages:
        print(f"resuming step {start} saved in stage layout {saved} as {stages}", file=sys.stderr)
        state = jax.jit(lambda s: convert_layout(s, saved, stages), out_shardings=state_sh)(state)
    ds.set_state(data_state)
    return start, state


def loop(state, step_fn, eval_fn, put, ds, ckpt, workdir, start, num_steps, model, run, optim, meta):
    """Steps start..num_steps with metrics, checkpoints and evaluation (eval_fn None: none); a
    SIGTERM/SIGINT saves the step and stops. -> (state, the last step's metrics record, None or
    (signal, step saved) when a signal stopped it). Each step is saved (when due) before it is
    evaluated, and a save in flight is committed whatever ends the loop."""
    writer = MetricsWriter(workdir, resume_step=start if start else None)
    schedule = lr_schedule(optim)
    tokens_per_step = run.batch_size * run.seq_len
    fpt, peak = flops_per_token(model, run.seq_len), measure_peak_flops(jnp.dtype(model.dtype))
    rec, stopped = {}, None
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc="train", dynamic_ncols=True,
               disable=None)
    try:
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
                stop = guard.should_stop()
                last = step + 1 == num_steps
                ckpt.save(step + 1, state, data_state=ds.get_state(), meta=meta, force=stop or last)
                if eval_fn is not None and not stop and ((step + 1) % run.eval_every == 0 or last):
                    rec.update(evaluate(eval_fn, state, put, ds, run.eval_batches))
                if (step + 1) % run.log_every == 0:
                    writer.write(step + 1, rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if stop:  # on a host the signal missed, guard.signum is None: name it SIGTERM
                    stopped = (guard.signum or signal.SIGTERM, step + 1)
                    break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return state, rec, stopped


def evaluate(eval_fn, state, put, ds, n_batches: int) -> dict:
    """Mean of each eval metric over the first `n_batches` validation batches."""
    vals = [jax.device_get(eval_fn(state, put(b))) for b in itertools.islice(ds.val_batches(), n_batches)]
    return {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}


def sample(graphdef, state, tokenizer, run: TrainConfig, stages=None) -> None:
    """A short greedy continuation through the inference engine's latent-cache decoder."""
    if tokenizer is None or not run.sample_tokens:
        return
    prompt = tokenizer.encode(run.sample_prompt) or [tokenizer.eos_id]
    params, biases = st.from_slots(state["params"], stages), st.from_slots(state["biases"], stages)
    res = generate(nnx.merge(graphdef, params, biases), [prompt],
                   max_new_tokens=run.sample_tokens, cache_dtype=jnp.float32)
    print("\n--- sample (greedy) ---\n" + tokenizer.decode(prompt + res.tokens[0]) + "\n---")


# ---- entry point: one error boundary --------------------------------------------------------------
def main(argv=None) -> int:
    """The exit statuses of the module docstring: the project's own errors print one line (their first:
    gin appends 'In call to configurable ...' lines), anything else keeps its traceback."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_interrupts():
            check_args(args)
            setup_devices(args)
            parse_gin(args.gin_file, args.gin_bindings)
            configured_train(args.workdir, args.dry_run, args.allow_config_change)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except Stopped as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return e.status
    except KeyboardInterrupt as e:  # Ctrl-C, a second one in the loop, or SIGTERM outside the loop
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}): stopped without saving; the same command "
              f"resumes from the last checkpoint, if any", file=sys.stderr)
        return exit_status(signum)
    return 0
