"""Pipeline parallelism over the `pipeline` mesh axis: GPipe (autodiff), and 1F1B and DualPipeV
(manual vjp) from one table-driven executor.

Shape letters (the package legend): N ranks (devices on the pipeline axis), C chunks (stages per
rank), M micro-batches, b sequences per micro-batch on a device, S sequence, D `dim`, Lm MoE slots
per stage, E experts, Tk ticks.

Stage layout (`parallel/stages.py`, V3 report §3.2 trains with PP16): the MoE layers are split over
the stages unevenly if need be, in their real order, the embedding and dense layers on stage 0,
the final norm, head and MTP modules on the last stage (MTP shares the head and the embedding).
The train state holds the MoE stack in slots, [N C Lm, ...] sharded over `pipeline`; a stage skips
its spare slots. Parameters used by one stage only (embedding, dense layers, head, MTP) are
replicated over the pipeline axis; their gradients are summed over it.

Everything runs in one `jax.shard_map` manual over every mesh axis: each device holds its stages'
slots, its experts (EP inside, `parallel/ep.py`), and its share of the batch (data and expert axes).
Activations and gradients move between ranks with `ppermute` once per tick.

  gpipe      tick t runs micro-batch t - s on stage s (Tk = M + N - 1), then `jax.grad` runs the
             scan backwards. Each stage call is rematerialised, so the stash is one stage input per
             tick: activation memory grows with M.
  1f1b       lockstep one-forward-one-backward (`schedule.build`): tick t does the forward of
             micro-batch t - s and the backward of micro-batch t - (2N - 2 - s).
  dualpipev  DeepSeek's V-shaped DualPipe (`schedule.py`): rank r holds stages r and 2N-1-r (so the
             embedding and the head share rank 0); in the steady phase a tick pairs a forward and a
             backward of different micro-batches, whose collectives are independent of each other's
             compute, and split backwards leave their weight gradients (W) to fill the drain.
Both manual schedules run the table of `schedule.build`: per tick a rank does at most one F, B and
W; a backward recomputes its stage from the stashed input under `jax.vjp` (a split B differentiates
the input only, its W the weights only, each recomputing the stage); inputs and output gradients
wait in two buffers whose slots `schedule.buffer_slots` assigns on the host (an entry holds a slot
from its arrival to its last use), each as large as the most entries any rank holds at once
(DualPipeV's 2N+1 inputs and N output gradients at N ranks), so activation memory does not grow
with M. The
last stage computes the loss inside its backward. Idle slots are skipped with `lax.cond` (their
collectives stay inside the expert group, whose devices share a rank, so every member takes the
same branch). Every schedule returns its executed tick table, from which `bubble` reports idle
slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.context import sequence_positions
from dsv3_jax.errors import ConfigError
from dsv3_jax.sharding import RULES, logical_to_spec
from dsv3_jax.parallel import stages as st
from dsv3_jax.train import loss as L
from dsv3_jax.train import schedule as sched_lib
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.balance import max_over_mean
from dsv3_jax.train.step import apply_gradients

SCHEDULES = sched_lib.NAMES
CHUNKS = {"gpipe": 1, "1f1b": 1, "dualpipev": 2}
PIPE = dict(RULES)["layers"]
BATCH = tuple(dict(RULES)["batch"])


def resolve_microbatches(microbatches: int, global_batch: int, mesh) -> int:
    """TrainConfig.pipeline_microbatches, where 0 means one per sequence of the per-device batch."""
    if microbatches:
        return microbatches
    return global_batch // int(np.prod([mesh.shape[a] for a in BATCH if a in mesh.shape]))


def stage_layout(cfg: ModelConfig, ranks: int, schedule: str = "1f1b", stage_layers: tuple[int, ...] = ()):
    """The StageLayout a schedule runs on `ranks` pipeline devices (TrainConfig.pipeline_stage_layers
    if given, else the balanced split)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"TrainConfig.pipeline_schedule={schedule!r}: expected one of {SCHEDULES}")
    return st.make_layout(cfg, ranks, CHUNKS[schedule], stage_layers)


def check_pipeline_layout(cfg: ModelConfig, stages: int, microbatches: int, local_batch: int, expert: int = 1,
                          schedule: str = "1f1b", stage_layers: tuple[int, ...] = ()):
    """Clear errors for a layer/batch layout the pipeline cannot run (microbatches 0: auto)."""
    stage_layout(cfg, stages, schedule, stage_layers)
    microbatches = microbatches or local_batch
    if local_batch % microbatches:
        raise ConfigError(f"TrainConfig.pipeline_microbatches={microbatches} must divide the per-device "
                         f"batch of {local_batch} sequences")
    if schedule == "dualpipev" and microbatches < 2 * stages:
        raise ConfigError(f"TrainConfig.pipeline_microbatches={microbatches}: dualpipev needs at least "
                          f"2 x MeshConfig.pipeline = {2 * stages} micro-batches")
    if expert > 1 and cfg.moe_impl != "ep":
        raise ConfigError(f"MeshConfig.expert={expert} with a pipeline needs ModelConfig.moe_impl='ep' "
                         f"(got {cfg.moe_impl!r})")


# ---------------------------------------------------------------------------------------------
def state_specs(state: nnx.State, mesh: Mesh):
    """PartitionSpec per variable of a params/biases State: the rules table, as outside the pipeline
    (the MoE stack's `layers` axis over `pipeline`, the experts over `expert`, the rest replicated)."""
    def one(var):
        return logical_to_spec(var.get_metadata()["logical_axes"], var.get_value().shape, mesh)
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _missing(spec: P, mesh_axes) -> tuple[str, ...]:
    used = set()
    for entry in spec:
        used.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
    return tuple(a for a in mesh_axes if a not in used)


def _vary(tree, specs, axes):
    """pcast every leaf to varying over the mesh axes its spec leaves it replicated on. Inside the
    pipeline every value is then varying over every axis, so scan carries and cond branches agree,
    and autodiff (gpipe) turns this cast into the one gradient psum per step."""
    return _per_spec(lambda x, miss: lax.pcast(x, miss, to="varying"), tree, specs, axes)


def _per_spec(fn, tree, specs, axes):
    """fn(leaf, mesh axes the leaf's spec does not shard) for every leaf with a non-empty set."""
    def one(spec, sub):
        miss = _missing(spec, axes)
        return jax.tree.map(lambda x: fn(x, miss), sub) if miss else sub
    return jax.tree.map(one, specs, tree, is_leaf=lambda x: isinstance(x, P))


def _zeros(tree, axes):
    return jax.tree.map(lambda s: lax.pcast(jnp.zeros(s.shape, s.dtype), axes, to="varying"), tree)


# ---------------------------------------------------------------------------------------------
# One stage on one micro-batch (local arrays; `model` holds this stage's slots): the model's own
# pieces, composed as Transformer.forward composes them, and the one loss.
def stage_forward(model, stage, n_stages, x_in, tokens, targets, mtp_lambda, alpha, axes, overlap=False,
                  active=None):
    """-> y [b,S,D], this stage's share of the micro-batch loss [], aux {ce, mtp, layers, mtp_layers}.
    stage may be traced; active [Lm] marks the slots that hold layers."""
    cfg: ModelConfig = model.cfg
    ctx = model.context(sequence_positions(*tokens.shape))
    first = lambda: model.trunk(model.embed(tokens), ctx, only="dense_layers")[0]  # noqa: E731
    h = lax.cond(stage == 0, first, lambda: x_in)
    h, layer_stats, _ = model.trunk(h, ctx, only="moe_layers", overlap=overlap and tokens.shape[0] % 2 == 0,
                                    active=active)

    def last():
        # final norm, head, the MTP chain; out.moe: the MTP modules'
        out = model.heads(h, tokens, ctx, logits=not cfg.loss_chunk)
        terms = L.losses(out, targets, model.head[...], cfg.loss_chunk)
        return terms["loss"], terms["mtp_loss"], out.moe

    shapes = jax.eval_shape(last)
    ce, mtp, mtp_stats = lax.cond(stage == n_stages - 1, last, lambda: _zeros(shapes, axes))
    bal = layer_stats.balance.sum() + (mtp_stats.balance.sum() if mtp_stats is not None else 0.0)
    terms = {"loss": ce, "mtp_loss": mtp, "balance_sum": bal}
    loss = L.total(terms, L.n_balance_layers(cfg), mtp_lambda, alpha)
    return h, loss, {"ce": ce, "mtp": mtp, "layers": layer_stats, "mtp_layers": mtp_stats}


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    graphdef: nnx.GraphDef
    cfg: ModelConfig
    mesh: Mesh
    microbatches: int
    alpha: float
    layout: st.StageLayout
    schedule: str
    overlap: bool = False

    @property
    def ranks(self) -> int:
        return self.mesh.shape[PIPE]

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.mesh.axis_names)


def _split_micro(plan: _Plan, x):
    return x.reshape(plan.microbatches, x.shape[0] // plan.microbatches, *x.shape[1:])


def _setup(plan: _Plan, pspecs, bspecs, params, biases, inputs, targets, mtp_lambda):
    """What every schedule's body starts with: values varying over every axis, micro-batches split."""
    axes = plan.axes
    params, biases = _vary(params, pspecs, axes), _vary(biases, bspecs, axes)
    inputs, targets = _split_micro(plan, inputs), _split_micro(plan, targets)
    inputs, targets = (lax.pcast(v, (PIPE,), to="varying") for v in (inputs, targets))
    return params, biases, inputs, targets, lax.pcast(mtp_lambda, axes, to="varying")


def _chunk(tree, c, plan: _Plan):
    """Chunk c's slots of every MoE-stack leaf: local rows [c Lm, (c+1) Lm)."""
    if plan.layout.chunks == 1:
        return tree
    Lm = plan.layout.slots
    return st.map_stack(lambda x: lax.dynamic_slice_in_dim(x, c * Lm, Lm, 0), tree)


def _stage_of(plan: _Plan, c):
    """The stage this rank runs as its chunk c: r, or 2N-1-r for DualPipeV's second chunk."""
    r = lax.axis_index(PIPE)
    return r if plan.layout.chunks == 1 else jnp.where(c == 0, r, 2 * plan.ranks - 1 - r)


def _stage_fn(plan: _Plan, biases, inputs, targets, mtp_lambda):
    """run(params, x, m, c) -> ((y, loss), aux): chunk c of this rank on micro-batch m."""
    r, layout = lax.axis_index(PIPE), plan.layout
    active = jnp.asarray(layout.slot_layer >= 0)  # [N, C, Lm]

    def run(p, x, m, c):
        stage = _stage_of(plan, c)
        model = nnx.merge(plan.graphdef, _chunk(p, c, plan), _chunk(biases, c, plan))
        y, loss, aux = stage_forward(model, stage, layout.stages, x, inputs[m], targets[m], mtp_lambda,
                                     plan.alpha, plan.axes, plan.overlap, active[r, c])
        return (y, loss), aux
    return run


def _finish(plan: _Plan, acc, activity):
    """Per-device sums over micro-batches -> the step's loss and aux (reduced over the mesh)."""
    batch = tuple(a for a in BATCH if a in plan.axes)
    M = plan.microbatches
    scalar = lambda v: lax.pmean(lax.psum(v, PIPE), batch) / M  # noqa: E731
    lay, mtp = acc["aux"]["layers"], acc["aux"]["mtp_layers"]  # MoEStats summed over micro-batches
    out = {
        "loss": scalar(acc["aux"]["ce"]),
        "mtp_loss": scalar(acc["aux"]["mtp"]),
        "layer_load": lax.psum(lay.load, batch),  # [C Lm, E] per rank: its slots
        "layer_balance": lax.pmean(lay.balance, batch) / M,
        "activity": activity[None],  # [1, Tk, 3] per rank (depends on the rank and tick only)
    }
    if mtp is not None:
        out["mtp_load"] = lax.psum(lax.psum(mtp.load, batch), PIPE)
        out["mtp_balance"] = lax.psum(lax.pmean(mtp.balance, batch), PIPE) / M
    if lay.ep_dropped is not None:  # ep.py's counters are per device inside a manual region
        out["layer_ep"] = jnp.stack([lax.psum(lay.ep_dropped, batch).astype(jnp.float32),
                                     lax.pmean(lay.ep_shards, batch) / M])
        if mtp is not None:
            out["mtp_ep"] = jnp.stack([lax.psum(lax.psum(mtp.ep_dropped, batch), PIPE).astype(jnp.float32),
                                       lax.psum(lax.pmean(mtp.ep_shards, batch), PIPE) / M])
    return scalar(acc["loss"]), out


# ---------------------------------------------------------------------------------------------
def _gpipe_body(plan: _Plan, pspecs, bspecs, params, biases, inputs, targets, mtp_lambda):
    axes, N, M = plan.axes, plan.ranks, plan.microbatches
    r = lax.axis_index(PIPE)
    params, biases, inputs, targets, mtp_lambda = _setup(plan, pspecs, bspecs, params, biases, inputs,
                                                         targets, mtp_lambda)
    stage = jax.checkpoint(_stage_fn(plan, biases, inputs, targets, mtp_lambda))

    def run(x, m):
        (y, loss), aux = stage(params, x, m, 0)
        return y, loss, aux

    x0 = _zeros(jax.ShapeDtypeStruct((*inputs.shape[1:], plan.cfg.dim), jnp.dtype(plan.cfg.dtype)), axes)
    zero_out = _zeros(jax.eval_shape(run, x0, 0), axes)

    def tick(carry, t):
        act, acc = carry
        i = t - r
        ok = (i >= 0) & (i < M)
        with jax.named_scope("slot_f"):  # the scope `slot_weights` counts
            y, loss, aux = lax.cond(ok, lambda: run(act, jnp.clip(i, 0, M - 1)), lambda: zero_out)
        acc = jax.tree.map(jnp.add, acc, {"loss": loss, "aux": aux})
        act = lax.ppermute(y, PIPE, [(k, k + 1) for k in range(N - 1)])
        return (act, acc), jnp.stack([ok, jnp.zeros_like(ok), jnp.zeros_like(ok)]).astype(jnp.int32)

    acc0 = {"loss": zero_out[1], "aux": zero_out[2]}
    (_, acc), activity = lax.scan(tick, (x0, acc0), jnp.arange(M + N - 1))
    return _finish(plan, acc, activity)


# ---------------------------------------------------------------------------------------------
# The table-driven executor (1f1b, dualpipev).
def _store(buf, slot, value):
    """buf [R, ...]: write value into `slot` if slot >= 0 (one in-place update)."""
    k = jnp.maximum(slot, 0)
    return buf.at[k].set(jnp.where(slot >= 0, value, buf[k]))


def _send(value, direction, N, used):
    """The three arrivals (from r-1, from r+1, this rank's own) of what each rank sends `direction`."""
    zero = jnp.zeros_like(value)
    down = lax.ppermute(jnp.where(direction == 1, value, zero), PIPE, [(k, k + 1) for k in range(N - 1)]) \
        if used["down"] else zero
    up = lax.ppermute(jnp.where(direction == -1, value, zero), PIPE, [(k + 1, k) for k in range(N - 1)]) \
        if used["up"] else zero
    return down, up, jnp.where(direction == 0, value, zero)


def _place(plan: _Plan, acc_aux, aux, c):
    """Add a stage's aux into the rank's accumulators: its layer stats into chunk c's slot rows."""
    if plan.layout.chunks == 1:
        return jax.tree.map(jnp.add, acc_aux, aux)
    Lm = plan.layout.slots

    def rows(a, x):
        return lax.dynamic_update_slice_in_dim(a, lax.dynamic_slice_in_dim(a, c * Lm, Lm, 0) + x, c * Lm, 0)
    out = jax.tree.map(jnp.add, {k: v for k, v in acc_aux.items() if k != "layers"},
                       {k: v for k, v in aux.items() if k != "layers"})
    return {**out, "layers": jax.tree.map(rows, acc_aux["layers"], aux["layers"])}


def _acc_zeros(plan: _Plan, aux_shape, axes):
    """Zero accumulators for a rank: the aux of one stage, its layer rows for all C chunks."""
    C = plan.layout.chunks
    lay = jax.tree.map(lambda s: jax.ShapeDtypeStruct((C * s.shape[0], *s.shape[1:]), s.dtype), aux_shape["layers"])
    return _zeros({**aux_shape, "layers": lay}, axes)


def _backward_ops(plan: _Plan, run, params, axes):
    """The B variants and W of one (chunk c, micro-batch m) from its stashed input x and output
    gradient dy: full (input and weight gradients), input-only (a split B), weights-only (its W)."""
    S = plan.layout.stages
    n_dp = int(np.prod([plan.mesh.shape[a] for a in BATCH if a in axes]))
    seed = 1.0 / (plan.microbatches * n_dp)  # d(step loss)/d(stage loss of one micro-batch on one device)

    def cot(c, dy, loss):  # the last stage's output feeds nothing: its only cotangent is the loss's
        dy = jnp.where(_stage_of(plan, c) == S - 1, jnp.zeros_like(dy), dy)
        return dy, lax.pcast(jnp.asarray(seed, loss.dtype), axes, to="varying")

    # Each takes the running weight-gradient sum and returns it updated: a branch that adds nothing
    # returns it as it is, so no params-sized zeros or partial sums are ever materialised.
    def full(grads, x, dy, m, c):
        (_, loss), vjp, aux = jax.vjp(lambda p, x: run(p, x, m, c), params, x, has_aux=True)
        dp, dx = vjp(cot(c, dy, loss))
        return jax.tree.map(jnp.add, grads, dp), dx, loss, aux

    def input_only(grads, x, dy, m, c):  # params are constants here: XLA drops the weight-gradient GEMMs
        (_, loss), vjp, aux = jax.vjp(lambda x: run(params, x, m, c), x, has_aux=True)
        (dx,) = vjp(cot(c, dy, loss))
        return grads, dx, loss, aux

    def weights_only(grads, x, dy, m, c):
        (_, loss), vjp, _ = jax.vjp(lambda p: run(p, x, m, c), params, has_aux=True)
        return jax.tree.map(jnp.add, grads, vjp(cot(c, dy, loss))[0])

    return full, input_only, weights_only


def _table_body(plan: _Plan, pspecs, bspecs, params, biases, inputs, targets, mtp_lambda):
    axes, N, M, S = plan.axes, plan.ranks, plan.microbatches, plan.layout.stages
    sched = sched_lib.build(plan.schedule, N, M)
    tabs = sched_lib.routes(sched)
    slots, sizes = sched_lib.buffer_slots(sched, tabs)
    has_split = bool(sched.b_split.any())
    used = {k: {"down": bool((tabs[k + "_dir"] == 1).any()), "up": bool((tabs[k + "_dir"] == -1).any())}
            for k in ("f", "b")}
    arrives = {k: [i for i in range(3) if (tabs[k + "_in"][..., i, 1] >= 0).any()] for k in ("act", "grad")}
    r = lax.axis_index(PIPE)
    params, biases, inputs, targets, mtp_lambda = _setup(plan, pspecs, bspecs, params, biases, inputs,
                                                         targets, mtp_lambda)
    run = _stage_fn(plan, biases, inputs, targets, mtp_lambda)
    full, input_only, weights_only = _backward_ops(plan, run, params, axes)
    backward = [full] + ([input_only] if has_split else [])  # indexed by the tick's b_split
    x0 = _zeros(jax.ShapeDtypeStruct((*inputs.shape[1:], plan.cfg.dim), jnp.dtype(plan.cfg.dtype)), axes)
    (_, loss_shape), aux_shape = jax.eval_shape(run, params, x0, 0, 0)
    idle = lambda grads, *_: (grads, jnp.zeros_like(x0), _zeros(loss_shape, axes), _zeros(aux_shape, axes))  # noqa: E731

    def tick(carry, row):
        inbuf, gbuf, arrived, grads, acc = carry
        for i in arrives["act"]:
            inbuf = _store(inbuf, row["act_slot"][r, i], arrived[0][i])
        for i in arrives["grad"]:
            gbuf = _store(gbuf, row["grad_slot"][r, i], arrived[1][i])
        slot = lambda op: (jnp.maximum(op[0], 0), jnp.maximum(op[1], 0))  # noqa: E731
        (fc, fm), (bc, bm), (wc, wm) = slot(row["f"][r]), slot(row["b"][r]), slot(row["w"][r])
        f_ok = (row["f"][r, 1] >= 0) & (_stage_of(plan, fc) < S - 1)  # the last stage's F runs inside its B
        b_ok = row["b"][r, 1] >= 0
        forward = lambda: run(params, inbuf[row["f_x"][r]], fm, fc)[0][0]  # noqa: E731
        b_args = (grads, inbuf[row["b_x"][r]], gbuf[row["b_dy"][r]], bm, bc)
        split = row["split"][r] if has_split else 0
        # One branch per tick and rank. Paired: F of one micro-batch and B of another in one
        # computation with no data path between them, the structure DualPipe's overlap needs
        # (tests/test_pipeline.py checks the HLO; each half still runs its own layer loop, and XLA
        # overlaps only within one computation, so interleaving them layer by layer comes next).
        # Apart: each its own conditional, so an idle slot computes nothing.
        def apart():  # named scopes: how often each runs, `slot_weights`
            with jax.named_scope("slot_f"):
                y = lax.cond(f_ok, forward, lambda: jnp.zeros_like(x0))
            with jax.named_scope("slot_b"):
                return y, *lax.switch(jnp.where(b_ok, 1 + split, 0), [idle, *backward], *b_args)

        def paired(b_op):
            def both():
                with jax.named_scope("paired_f"):
                    y = forward()
                with jax.named_scope("paired_b"):
                    return y, *b_op(*b_args)
            return both
        y, grads, dx, loss, aux = lax.switch(jnp.where(f_ok & b_ok, 1 + split, 0),
                                             [apart, *(paired(op) for op in backward)])
        w_ok = row["w"][r, 1] >= 0
        if has_split:
            with jax.named_scope("slot_w"):
                grads = lax.cond(w_ok, lambda: weights_only(grads, inbuf[row["w_x"][r]], gbuf[row["w_dy"][r]], wm, wc),
                                 lambda: grads)
        acc = {"loss": acc["loss"] + loss, "aux": _place(plan, acc["aux"], aux, bc)}
        arrived = (_send(y, row["f_dir"][r], N, used["f"]), _send(dx, row["b_dir"][r], N, used["b"]))
        return (inbuf, gbuf, arrived, grads, acc), jnp.stack([row["f"][r, 1] >= 0, b_ok, w_ok]).astype(jnp.int32)

    buf = lambda n: _zeros(jax.ShapeDtypeStruct((n, *x0.shape), x0.dtype), axes)  # noqa: E731
    three = (jnp.zeros_like(x0),) * 3
    carry = (buf(sizes["act"]), buf(sizes["grad"]), (three, three), jax.tree.map(jnp.zeros_like, params),
             {"loss": _zeros(loss_shape, axes), "aux": _acc_zeros(plan, aux_shape, axes)})
    xs = {k: jnp.asarray(v) for k, v in {**tabs, **slots}.items() if not k.endswith("_in")}
    (_, _, _, grads, acc), activity = lax.scan(tick, carry, xs)
    grads = _per_spec(lax.psum, grads, pspecs, axes)  # the one gradient all-reduce of the step
    loss, aux = _finish(plan, acc, activity)
    return loss, aux, grads


# ---------------------------------------------------------------------------------------------
def _aux_specs(cfg: ModelConfig) -> dict:
    """out_specs of `_finish`'s aux: per-rank rows are sharded over the pipeline axis."""
    specs = {"loss": P(), "mtp_loss": P(), "layer_load": P(PIPE), "layer_balance": P(PIPE), "activity": P(PIPE)}
    mtp_moe = cfg.n_mtp_modules > 0 and cfg.n_routed_experts > 0
    if mtp_moe:
        specs.update(mtp_load=P(), mtp_balance=P())
    if cfg.moe_impl == "ep":
        specs["layer_ep"] = P(None, PIPE)
        if mtp_moe:
            specs["mtp_ep"] = P()
    return specs


def _assemble(aux: dict, layout: st.StageLayout) -> dict:
    """Slot rows -> the metrics train.step reports, in layer order (MoE layers first, then MTP)."""
    layers = lambda rows: st.slot_rows_to_layers(rows, layout)  # noqa: E731
    lay = {"load": layers(aux["layer_load"]), "balance": layers(aux["layer_balance"])}
    rows = lambda k: [lay[k]] + ([aux["mtp_" + k]] if "mtp_" + k in aux else [])  # noqa: E731
    out = {"loss": aux["loss"], "mtp_loss": aux["mtp_loss"],
           "load": jnp.concatenate(rows("load")),
           "balance_loss": jnp.concatenate(rows("balance")).mean(),
           "pipeline_activity": aux["activity"]}  # [N, Tk, 3]: forward / backward / weight slot busy
    if "layer_ep" in aux:
        ep = layers(aux["layer_ep"].T).T  # [2, L]
        ep = jnp.concatenate([ep] + ([aux["mtp_ep"]] if "mtp_ep" in aux else []), axis=-1)  # [2, L + Dm]
        out.update(ep_dropped=ep[0].sum(), ep_shards_per_token=ep[1].mean())
    return out


def make_loss_and_grads(graphdef, cfg: ModelConfig, mesh: Mesh, *, schedule: str, microbatches: int = 0,
                        alpha: float, overlap: bool = False, layout: st.StageLayout | None = None):
    """-> f(params, biases, batch {inputs, targets} [B,S], mtp_lambda) -> (loss, aux, grads).

    params, biases and grads hold the MoE stack in `layout`'s slots (`stages.to_slots`; the model's
    own layout where the split is even). loss is the step's total (CE + lambda MTP + alpha balance)
    as in train.step.loss_fn; aux holds loss (CE), mtp_loss, balance_loss, load [L + Dm, E] in layer
    order, ep_dropped / ep_shards_per_token (EP) and pipeline_activity [N, Tk, 3].
    """
    layout = layout or stage_layout(cfg, mesh.shape[PIPE], schedule)
    if (layout.ranks, layout.chunks) != (mesh.shape[PIPE], CHUNKS[schedule]):
        raise ConfigError(f"stage layout of {layout.ranks} ranks x {layout.chunks} chunks does not fit "
                          f"{schedule!r} on {mesh.shape[PIPE]} pipeline devices")
    body = _gpipe_body if schedule == "gpipe" else _table_body
    tok = P(tuple(a for a in BATCH if a in mesh.axis_names))

    def f(params, biases, batch, mtp_lambda):
        M = resolve_microbatches(microbatches, batch["inputs"].shape[0], mesh)
        plan = _Plan(graphdef, cfg, mesh, M, alpha, layout, schedule, overlap)
        pspecs, bspecs = state_specs(params, mesh), state_specs(biases, mesh)
        out_specs = (P(), _aux_specs(cfg)) + ((pspecs,) if schedule != "gpipe" else ())
        run = jax.shard_map(functools.partial(body, plan, pspecs, bspecs), mesh=mesh,
                            in_specs=(pspecs, bspecs, tok, tok, P()), out_specs=out_specs)
        args = (params, biases, batch["inputs"], batch["targets"], jnp.asarray(mtp_lambda, jnp.float32))
        if schedule != "gpipe":
            loss, aux, grads = run(*args)
        else:
            (loss, aux), grads = jax.value_and_grad(run, has_aux=True)(*args)
        return loss, _assemble(aux, layout), grads

    return f


def make_pipeline_train_step(graphdef, tx: optax.GradientTransformation, run: TrainConfig, cfg: ModelConfig,
                             mesh: Mesh, layout: st.StageLayout | None = None):
    """The pipelined twin of train.step.make_train_step: step(state, batch, gamma, mtp_lambda) ->
    (state, metrics), with the state's MoE stack in `layout`'s slots, the same metrics (in layer
    order), plus ep_* counters and pipeline_bubble."""
    layout = layout or stage_layout(cfg, mesh.shape[PIPE], run.pipeline_schedule, run.pipeline_stage_layers)
    loss_and_grads = make_loss_and_grads(graphdef, cfg, mesh, schedule=run.pipeline_schedule,
                                         microbatches=run.pipeline_microbatches, alpha=run.balance_alpha,
                                         overlap=run.overlap_microbatches, layout=layout)
    L = cfg.n_moe_layers

    def step(state, batch, gamma, mtp_lambda):
        _, aux, grads = loss_and_grads(state["params"], state["biases"], batch, mtp_lambda)
        load = aux.pop("load")  # [L + Dm, E], layer order; the biases are in slots
        activity = aux.pop("pipeline_activity")
        slot_load = jnp.concatenate([st.layer_rows_to_slots(load[:L], layout), load[L:]])
        new_state, update = apply_gradients(state, grads, slot_load, tx, gamma, layout.slot_layer.size)
        update.update(expert_load=load, load_max_over_mean=max_over_mean(load))
        return new_state, {**aux, **update, "pipeline_bubble": bubble(activity)}

    return step


def bubble(activity) -> jax.Array:
    """Idle fraction of the slots the schedule ran: activity [N, Tk, 3] (forward, backward, weight),
    counting only the slot kinds the schedule uses (gpipe's forward scan: the backward mirrors it).
    Same numbers as `schedule_table` gives on the host."""
    activity = jnp.asarray(activity)
    kinds = (activity.sum(axis=tuple(range(activity.ndim - 1))) > 0).sum()
    return 1.0 - activity.sum() / (activity[..., 0].size * kinds)


def slot_weights(schedule: str, ranks: int, microbatches: int) -> dict[str, float]:
    """How often each named branch of a tick runs, per tick and averaged over ranks: paired_f and
    paired_b (a pair in one branch), slot_f, slot_b, slot_w (alone). For `hlo.collective_bytes`,
    which otherwise counts every branch of every tick."""
    N, M = ranks, microbatches
    if schedule == "gpipe":  # one forward slot per tick, M of M + N - 1 busy; its backward mirrors it
        return {"slot_f": M / (M + N - 1)}
    s = sched_lib.build(schedule, N, M)
    stage = np.vectorize(s.stage)(np.arange(N)[None, :], np.maximum(s.f[..., 0], 0))
    f = (s.f[..., 1] >= 0) & (stage < s.stages - 1)  # the last stage's F runs inside its B
    b, w = s.b[..., 1] >= 0, s.w[..., 1] >= 0
    share = lambda x: float(x.mean())  # noqa: E731  (over ticks and ranks)
    return {"paired_f": share(f & b), "paired_b": share(f & b), "slot_f": share(f & ~b),
            "slot_b": share(b & ~f), "slot_w": share(w)}


def stash_slots(schedule: str, ranks: int, microbatches: int) -> dict[str, int] | None:
    """{"act": inputs, "grad": output gradients}: the stage-input-sized values a rank's buffers hold
    (`schedule.buffer_slots`); None for gpipe, whose autodiff keeps every tick's input."""
    if schedule == "gpipe":
        return None
    s = sched_lib.build(schedule, ranks, microbatches)
    return sched_lib.buffer_slots(s, sched_lib.routes(s))[1]


def schedule_table(schedule: str, ranks: int, microbatches: int) -> np.ndarray:
    """The [N, Tk, 3] activity (forward, backward, weight-gradient slot busy) the schedule runs."""
    s = sched_lib.build(schedule, ranks, microbatches)
    return np.stack([t[..., 1] >= 0 for t in (s.f, s.b, s.w)], -1).transpose(1, 0, 2).astype(np.int32)
