"""Pipeline parallelism over the `pipeline` mesh axis: GPipe (autodiff) and a lockstep 1F1B (manual vjp).

Shape letters (the package legend): P stages, M micro-batches, b sequences per micro-batch on a
device, S sequence, D `dim`, L MoE layers (L/P per stage), Dm MTP depth, E experts, Tk ticks.

Stage layout (V3 report §3.2 trains with PP16): the scanned MoE layers are split evenly over the
stages (their stacked `layers` axis is sharded over `pipeline`); the embedding and the dense layers
run on the first stage, the final norm, the head and the MTP modules on the last (MTP shares the
head and the embedding). Parameters used by one stage only are replicated over the pipeline axis;
their gradients are summed over it.

Everything runs in one `jax.shard_map` manual over every mesh axis: each device holds its stage's
layers, its experts (EP inside, `parallel/ep.py`), and its share of the batch (data and expert axes).
Activations move stage to stage with `ppermute` once per tick.

  gpipe  tick t runs micro-batch t - s on stage s (Tk = M + P - 1 ticks), then `jax.grad` runs the
         scan backwards. Each stage call is rematerialised (`jax.checkpoint`), so the stash is one
         stage input per tick: activation memory grows with M.
  1f1b   lockstep one-forward-one-backward: tick t does the forward of micro-batch t - s and the
         backward of micro-batch t - (2P - 2 - s) (Tk = M + 2P - 2). The backward recomputes the
         stage under `jax.vjp` from its stashed input (a ring of 2P - 1 inputs), the last stage does
         its forward inside its backward slot, and gradients go back with a reverse ppermute in the
         same tick. Activation memory is O(P), independent of M.
With `overlap`, each stage runs its micro-batch's MoE layers as two interleaved halves
(`block.py`: one half's all-to-all overlaps the other's compute). Bubble ticks are
skipped with `lax.cond` (their collectives stay inside the expert group, whose
devices share a stage, so every member takes the same branch). Both schedules return per-tick
activity, from which `bubble` reports idle stage slots; textbook GPipe and 1F1B both idle
(P-1)/(M+P-1) of the time. 1F1B buys memory, not bubble.
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
from dsv3_jax.train import loss as L
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.step import apply_gradients

SCHEDULES = ("gpipe", "1f1b")
PIPE = dict(RULES)["layers"]
BATCH = tuple(dict(RULES)["batch"])


def resolve_microbatches(microbatches: int, global_batch: int, mesh) -> int:
    """TrainConfig.pipeline_microbatches, where 0 means one per sequence of the per-device batch."""
    if microbatches:
        return microbatches
    return global_batch // int(np.prod([mesh.shape[a] for a in BATCH if a in mesh.shape]))


def check_pipeline_layout(cfg: ModelConfig, stages: int, microbatches: int, local_batch: int, expert: int = 1):
    """Clear errors for a layer/batch layout the pipeline cannot split (microbatches 0: auto)."""
    microbatches = microbatches or local_batch
    if cfg.n_moe_layers < stages or cfg.n_moe_layers % stages:
        raise ConfigError(f"MeshConfig.pipeline={stages} must divide the {cfg.n_moe_layers} MoE layers "
                         f"(n_layers={cfg.n_layers} - n_dense_layers={cfg.n_dense_layers}); the dense "
                         "layers run on the first stage")
    if local_batch % microbatches:
        raise ConfigError(f"TrainConfig.pipeline_microbatches={microbatches} must divide the per-device "
                         f"batch of {local_batch} sequences")
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
# One stage on one micro-batch (local arrays; `model` holds this stage's layers): the model's own
# pieces, composed as Transformer.forward composes them, and the one loss.
def stage_forward(model, s, n_stages, x_in, tokens, targets, mtp_lambda, alpha, axes, overlap=False):
    """-> y [b,S,D], this stage's share of the micro-batch loss [], aux {ce, mtp, layers, mtp_layers}."""
    cfg: ModelConfig = model.cfg
    ctx = model.context(sequence_positions(*tokens.shape))
    first = lambda: model.trunk(model.embed(tokens), ctx, only="dense_layers")[0]  # noqa: E731
    h = lax.cond(s == 0, first, lambda: x_in)
    h, layer_stats, _ = model.trunk(h, ctx, only="moe_layers", overlap=overlap and tokens.shape[0] % 2 == 0)

    def last():
        out = model.heads(h, tokens, ctx)  # final norm, head, the MTP chain; out.moe: the MTP modules'
        terms = L.losses(out, targets)
        return terms["loss"], terms["mtp_loss"], out.moe

    shapes = jax.eval_shape(last)
    ce, mtp, mtp_stats = lax.cond(s == n_stages - 1, last, lambda: _zeros(shapes, axes))
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
    overlap: bool = False

    @property
    def stages(self) -> int:
        return self.mesh.shape[PIPE]

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.mesh.axis_names)


def _split_micro(plan: _Plan, x):
    return x.reshape(plan.microbatches, x.shape[0] // plan.microbatches, *x.shape[1:])


def _finish(plan: _Plan, acc, activity):
    """Per-device sums over micro-batches -> the step's loss and aux (reduced over the mesh)."""
    batch = tuple(a for a in BATCH if a in plan.axes)
    M = plan.microbatches
    scalar = lambda v: lax.pmean(lax.psum(v, PIPE), batch) / M  # noqa: E731
    lay, mtp = acc["aux"]["layers"], acc["aux"]["mtp_layers"]  # MoEStats summed over micro-batches
    out = {
        "loss": scalar(acc["aux"]["ce"]),
        "mtp_loss": scalar(acc["aux"]["mtp"]),
        "layer_load": lax.psum(lay.load, batch),
        "layer_balance": lax.pmean(lay.balance, batch) / M,
        "activity": activity[None],  # [1, Tk, 2] per stage (depends on the stage and tick only)
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


def _gpipe_body(plan: _Plan, pspecs, bspecs, params, biases, inputs, targets, mtp_lambda):
    axes, Pn, M = plan.axes, plan.stages, plan.microbatches
    s = lax.axis_index(PIPE)
    params, biases = _vary(params, pspecs, axes), _vary(biases, bspecs, axes)
    inputs, targets = _split_micro(plan, inputs), _split_micro(plan, targets)
    inputs, targets = (lax.pcast(v, (PIPE,), to="varying") for v in (inputs, targets))
    mtp_lambda = lax.pcast(mtp_lambda, axes, to="varying")
    model = nnx.merge(plan.graphdef, params, biases)

    @jax.checkpoint
    def run(x, tok, tgt):
        return stage_forward(model, s, Pn, x, tok, tgt, mtp_lambda, plan.alpha, axes, plan.overlap)

    x0 = _zeros(jax.ShapeDtypeStruct((*inputs.shape[1:], plan.cfg.dim), jnp.dtype(plan.cfg.dtype)), axes)
    out_shape = jax.eval_shape(run, x0, inputs[0], targets[0])
    zero_out = _zeros(out_shape, axes)

    def tick(carry, t):
        act, acc = carry
        i = t - s
        ok = (i >= 0) & (i < M)
        ic = jnp.clip(i, 0, M - 1)
        y, loss, aux = lax.cond(ok, lambda: run(act, inputs[ic], targets[ic]), lambda: zero_out)
        acc = jax.tree.map(jnp.add, acc, {"loss": loss, "aux": aux})
        act = lax.ppermute(y, PIPE, [(k, k + 1) for k in range(Pn - 1)])
        return (act, acc), jnp.stack([ok, jnp.zeros_like(ok)]).astype(jnp.int32)

    acc0 = {"loss": zero_out[1], "aux": zero_out[2]}
    (_, acc), activity = lax.scan(tick, (x0, acc0), jnp.arange(M + Pn - 1))
    return _finish(plan, acc, activity)


def _1f1b_body(plan: _Plan, pspecs, bspecs, params, biases, inputs, targets, mtp_lambda):
    axes, Pn, M = plan.axes, plan.stages, plan.microbatches
    R = 2 * Pn - 1  # stash ring: an input lives 2P - 2 - 2s ticks
    s = lax.axis_index(PIPE)
    params, biases = _vary(params, pspecs, axes), _vary(biases, bspecs, axes)
    inputs, targets = _split_micro(plan, inputs), _split_micro(plan, targets)
    inputs, targets = (lax.pcast(v, (PIPE,), to="varying") for v in (inputs, targets))
    mtp_lambda = lax.pcast(mtp_lambda, axes, to="varying")
    n_dp = int(np.prod([plan.mesh.shape[a] for a in BATCH if a in axes]))
    seed = 1.0 / (M * n_dp)  # d(step loss)/d(stage loss of one micro-batch on one device)

    def run(p, x, tok, tgt):
        model = nnx.merge(plan.graphdef, p, biases)
        y, loss, aux = stage_forward(model, s, Pn, x, tok, tgt, mtp_lambda, plan.alpha, axes, plan.overlap)
        return (y, loss), aux

    x0 = _zeros(jax.ShapeDtypeStruct((*inputs.shape[1:], plan.cfg.dim), jnp.dtype(plan.cfg.dtype)), axes)
    (y_shape, loss_shape), aux_shape = jax.eval_shape(run, params, x0, inputs[0], targets[0])
    zero_aux, zero_grads = _zeros(aux_shape, axes), jax.tree.map(jnp.zeros_like, params)

    def forward(x, i):
        return run(params, x, inputs[i], targets[i])[0][0]

    def backward(x, dy, i):
        (_, loss), vjp, aux = jax.vjp(lambda p, x: run(p, x, inputs[i], targets[i]), params, x, has_aux=True)
        dp, dx = vjp((dy, lax.pcast(jnp.asarray(seed, loss.dtype), axes, to="varying")))
        return dp, dx, loss, aux

    def tick(carry, t):
        act, grad, stash, grads, acc = carry
        i_f, i_b = t - s, t - (2 * Pn - 2 - s)
        f_in = (i_f >= 0) & (i_f < M)
        f_ok = f_in & (s < Pn - 1)  # the last stage runs its forward inside its backward slot
        b_ok = (i_b >= 0) & (i_b < M)
        stash = jnp.where(f_in, stash.at[i_f % R].set(act), stash)
        y = lax.cond(f_ok, lambda: forward(act, jnp.clip(i_f, 0, M - 1)), lambda: jnp.zeros_like(act))
        ib = jnp.clip(i_b, 0, M - 1)
        dp, dx, loss, aux = lax.cond(b_ok, lambda: backward(stash[ib % R], grad, ib),
                                     lambda: (zero_grads, jnp.zeros_like(act), _zeros(loss_shape, axes), zero_aux))
        grads = jax.tree.map(jnp.add, grads, dp)
        acc = jax.tree.map(jnp.add, acc, {"loss": loss, "aux": aux})
        act = lax.ppermute(y, PIPE, [(k, k + 1) for k in range(Pn - 1)])
        grad = lax.ppermute(dx, PIPE, [(k + 1, k) for k in range(Pn - 1)])
        return (act, grad, stash, grads, acc), jnp.stack([f_in, b_ok]).astype(jnp.int32)

    stash0 = _zeros(jax.ShapeDtypeStruct((R, *x0.shape), x0.dtype), axes)
    acc0 = {"loss": _zeros(loss_shape, axes), "aux": zero_aux}
    carry = (x0, jnp.zeros_like(x0), stash0, zero_grads, acc0)
    (_, _, _, grads, acc), activity = lax.scan(tick, carry, jnp.arange(M + 2 * Pn - 2))
    grads = _per_spec(lax.psum, grads, pspecs, axes)  # the one gradient all-reduce of the step
    loss, aux = _finish(plan, acc, activity)
    return loss, aux, grads


def _aux_specs(cfg: ModelConfig) -> dict:
    """out_specs of `_finish`'s aux: per-stage rows are sharded over the pipeline axis."""
    specs = {"loss": P(), "mtp_loss": P(), "layer_load": P(PIPE), "layer_balance": P(PIPE), "activity": P(PIPE)}
    mtp_moe = cfg.n_mtp_modules > 0 and cfg.n_routed_experts > 0
    if mtp_moe:
        specs.update(mtp_load=P(), mtp_balance=P())
    if cfg.moe_impl == "ep":
        specs["layer_ep"] = P(None, PIPE)
        if mtp_moe:
            specs["mtp_ep"] = P()
    return specs


def _assemble(aux: dict) -> dict:
    """Stage-sharded pieces -> the metrics train.step reports (MoE layers first, then MTP)."""
    rows = lambda k: [aux[k]] + ([aux["mtp_" + k[6:]]] if "mtp_" + k[6:] in aux else [])  # noqa: E731
    out = {"loss": aux["loss"], "mtp_loss": aux["mtp_loss"],
           "load": jnp.concatenate(rows("layer_load")),
           "balance_loss": jnp.concatenate(rows("layer_balance")).mean(),
           "pipeline_activity": aux["activity"]}  # [P, Tk, 2]: forward / backward slot busy
    if "layer_ep" in aux:
        ep = jnp.concatenate(rows("layer_ep"), axis=-1)  # [2, L + Dm]
        out.update(ep_dropped=ep[0].sum(), ep_shards_per_token=ep[1].mean())
    return out


def make_loss_and_grads(graphdef, cfg: ModelConfig, mesh: Mesh, *, schedule: str, microbatches: int = 0,
                        alpha: float, overlap: bool = False):
    """-> f(params, biases, batch {inputs, targets} [B,S], mtp_lambda) -> (loss, aux, grads).

    loss is the step's total (CE + lambda MTP + alpha balance) as in train.step.loss_fn; aux holds
    loss (CE), mtp_loss, balance_loss, load [L + Dm, E], ep_dropped / ep_shards_per_token (EP) and
    pipeline_activity [P, Tk, 2].
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"TrainConfig.pipeline_schedule={schedule!r}: expected one of {SCHEDULES}")
    body = _gpipe_body if schedule == "gpipe" else _1f1b_body
    tok = P(tuple(a for a in BATCH if a in mesh.axis_names))

    def f(params, biases, batch, mtp_lambda):
        M = resolve_microbatches(microbatches, batch["inputs"].shape[0], mesh)
        plan = _Plan(graphdef, cfg, mesh, M, alpha, overlap)
        pspecs, bspecs = state_specs(params, mesh), state_specs(biases, mesh)
        out_specs = (P(), _aux_specs(cfg)) + ((pspecs,) if schedule == "1f1b" else ())
        run = jax.shard_map(functools.partial(body, plan, pspecs, bspecs), mesh=mesh,
                            in_specs=(pspecs, bspecs, tok, tok, P()), out_specs=out_specs)
        args = (params, biases, batch["inputs"], batch["targets"], jnp.asarray(mtp_lambda, jnp.float32))
        if schedule == "1f1b":
            loss, aux, grads = run(*args)
        else:
            (loss, aux), grads = jax.value_and_grad(run, has_aux=True)(*args)
        return loss, _assemble(aux), grads

    return f


def make_pipeline_train_step(graphdef, tx: optax.GradientTransformation, run: TrainConfig, cfg: ModelConfig,
                             mesh: Mesh):
    """The pipelined twin of train.step.make_train_step: step(state, batch, gamma, mtp_lambda) ->
    (state, metrics), with the same state and metrics, plus ep_* counters and pipeline_bubble."""
    loss_and_grads = make_loss_and_grads(graphdef, cfg, mesh, schedule=run.pipeline_schedule,
                                         microbatches=run.pipeline_microbatches, alpha=run.balance_alpha,
                                         overlap=run.overlap_microbatches)

    def step(state, batch, gamma, mtp_lambda):
        _, aux, grads = loss_and_grads(state["params"], state["biases"], batch, mtp_lambda)
        load = aux.pop("load")
        activity = aux.pop("pipeline_activity")
        new_state, update_metrics = apply_gradients(state, grads, load, tx, gamma, cfg.n_moe_layers)
        return new_state, {**aux, **update_metrics, "pipeline_bubble": bubble(activity)}

    return step


def bubble(activity) -> jax.Array:
    """Idle fraction of the stage slots the schedule ran: activity [P, Tk, 2] (forward, backward).

    gpipe counts its forward scan (the backward scan mirrors it); 1f1b has a forward and a
    backward slot per tick. Same numbers as `schedule_table` computes on the host.
    """
    activity = jnp.asarray(activity)
    fwd_only = activity[..., 1].sum() == 0
    slots = activity[..., 0].size * jnp.where(fwd_only, 1, 2)
    return 1.0 - activity.sum() / slots


def schedule_table(schedule: str, stages: int, microbatches: int) -> np.ndarray:
    """The [P, Tk, 2] activity the schedule runs (host-side, for docs and the benchmark)."""
    Pn, M = stages, microbatches
    T = M + Pn - 1 if schedule == "gpipe" else M + 2 * Pn - 2
    t = np.arange(T)[None]
    s = np.arange(Pn)[:, None]
    f = (t - s >= 0) & (t - s < M)
    b = np.zeros_like(f) if schedule == "gpipe" else (t - (2 * Pn - 2 - s) >= 0) & (t - (2 * Pn - 2 - s) < M)
    return np.stack([f, b], -1).astype(np.int32)
