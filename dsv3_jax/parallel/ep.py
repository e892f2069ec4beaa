"""Expert parallelism: routed experts sharded over the `expert` mesh axis, tokens moved by all-to-all.

Shape letters (the package legend): N tokens on this device, D `dim`, K activated experts per
token, X the EP degree (shards of the expert axis), El = E / X experts per shard, U the capacity
(token slots per source->destination pair), J = min(K, El) expert slots a token can use on one
shard.

One MoE layer on one device, inside `jax.shard_map` (V3 report §3.2.2, ISCA '25 §4.3):
  1. dispatch plan: shard r holds experts [r El, (r+1) El). A token is sent to shard r *once*
     if any of its K experts lives there (the per-node de-duplication DeepSeek does on IB), together
     with the ids (local to r) and gate weights of its experts on r. With the node-limited gate
     and groups laid out on shards (E/G experts per group, contiguous), a token reaches at most
     n_limited_groups * max(1, X/G) shards; `shards_per_token` measures it.
  2. the send buffer [X, U, D] holds, for each destination, the tokens sorted by destination in
     token order; slots past a destination's count are padding. U defaults to N (the worst case:
     every token goes to every shard), so nothing is ever dropped, as DeepSeek trains. With
     `ep_capacity_factor` > 0, U = ceil(factor * N * reach / X) and overflow is counted in
     `dropped` (token-shard pairs whose expert outputs are lost).
  3. dispatch: `lax.all_to_all` of the buffer (portable; XLA:CPU has no ragged-all-to-all), or
     `lax.ragged_all_to_all` with the same layout that sends only the filled slots (GPU/TPU).
     Activations travel in `ep_dispatch` format (default FP8 E4M3 with pow2 1x128 scales).
  4. local experts: the received slots expand to [X U J] rows, sorted by local expert, through
     `experts.routed_experts` (the same grouped GEMMs as the local path); each slot's rows are summed
     with their gate weights on the expert side, so the combine sends one vector per token-shard.
  5. combine: the reverse all-to-all in `ep_combine` format (default BF16, or LogFMT-n), then a
     scatter-add of each shard's partial output onto the token.
Both transfers are `custom_vjp`s: the backward of dispatch moves gradients in the combine format
and the backward of combine in the dispatch format (DeepSeek: backward combine BF16, the gradient
before the down-projection FP8).

The mesh comes from the ambient context: inside a `shard_map` that already made the expert axis
manual (the pipeline), the layer runs directly on local arrays; otherwise it opens its own
`shard_map` over the ambient mesh of `jax.set_mesh(mesh)` (train.py sets it). No module-level mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.experts import routed_experts
from dsv3_jax.parallel import wire
from dsv3_jax.sharding import RULES
from dsv3_jax.errors import ConfigError


def _rule(name: str):
    return dict(RULES)[name]


EXPERT_AXIS = _rule("exp")  # the mesh axis experts are sharded over
BATCH_AXES = tuple(_rule("batch"))  # the mesh axes tokens are sharded over


def max_shards_per_token(cfg: ModelConfig, ep: int) -> int:
    """The most shards one token can reach: K experts, node-limited to n_limited_groups groups."""
    reach = min(ep, cfg.n_activated_experts)
    G = cfg.n_expert_groups
    if G > 1 and (G % ep == 0 or ep % G == 0):  # groups lie on whole shards, or shards in groups
        reach = min(reach, cfg.n_limited_groups * max(1, ep // G))
    return reach


def capacity(cfg: ModelConfig, n_tokens: int, ep: int) -> int:
    """Token slots per (source, destination) pair: N (dropless) unless a capacity factor is set."""
    if cfg.ep_capacity_factor <= 0:
        return n_tokens
    expected = n_tokens * max_shards_per_token(cfg, ep) / ep
    return max(1, min(n_tokens, math.ceil(cfg.ep_capacity_factor * expected)))


# ---------------------------------------------------------------------------------------------
# Transport: [X, U, ...] buffers, chunk r to shard r; received chunk r came from shard r.
def _move(payload, axis, sizes):
    if sizes is None:
        return tuple(lax.all_to_all(p, axis, 0, 0, tiled=True) for p in payload)
    send, recv = sizes
    out = []
    for p in payload:
        X, U = p.shape[:2]
        flat = p.reshape(X * U, *p.shape[2:])
        offsets = jnp.arange(X, dtype=jnp.int32) * U
        here = jnp.full((X,), lax.axis_index(axis) * U, jnp.int32)  # where my chunk lands on each peer
        got = lax.ragged_all_to_all(flat, jnp.zeros_like(flat), offsets, send, here, recv, axis_name=axis)
        out.append(got.reshape(p.shape))
    return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def transfer(x, sizes, fwd_fmt: str, bwd_fmt: str, axis: str):
    """All-to-all x [X, U, D] in `fwd_fmt`; its gradient travels back in `bwd_fmt`.

    sizes: None for the fixed-capacity all_to_all, or (send [X], recv [X]) int32 slot counts for
    ragged_all_to_all.
    """
    return wire.decode(_move(wire.encode(x, fwd_fmt), axis, sizes), fwd_fmt, x.dtype)


def _transfer_fwd(x, sizes, fwd_fmt, bwd_fmt, axis):
    return transfer(x, sizes, fwd_fmt, bwd_fmt, axis), sizes


def _transfer_bwd(fwd_fmt, bwd_fmt, axis, sizes, ct):
    back = None if sizes is None else (sizes[1], sizes[0])
    return wire.decode(_move(wire.encode(ct, bwd_fmt), axis, back), bwd_fmt, ct.dtype), None


transfer.defvjp(_transfer_fwd, _transfer_bwd)


# ---------------------------------------------------------------------------------------------
def dispatch_plan(indices, weights, *, ep: int, n_local: int, cap: int):
    """Where each token goes. indices/weights [N,K] -> dict of
    slot_token [X,U] (token id, N for an empty slot), ids [X,U,J] local expert ids (n_local: none),
    gates [X,U,J] f32, counts [X] filled slots, dropped [] token-shard pairs over capacity,
    reach [N] shards each token reaches."""
    N, K = indices.shape
    J = min(K, n_local)
    shard = indices // n_local  # [N,K]
    here = shard[:, None, :] == jnp.arange(ep)[None, :, None]  # [N,X,K]
    hit = here.any(-1)  # [N,X]
    pos = jnp.cumsum(hit, axis=0) - 1  # slot of token n in the buffer to shard r
    kept = hit & (pos < cap)
    rows = jnp.where(kept, pos, cap)  # out of range -> dropped by the scatter
    slot_token = jnp.full((ep, cap), N, jnp.int32).at[
        jnp.broadcast_to(jnp.arange(ep)[None], (N, ep)), rows].set(
        jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[:, None], (N, ep)), mode="drop")
    # per (token, shard): that shard's experts first (stable), keep J of them
    first = jnp.argsort(~here, axis=-1, stable=True)[..., :J]  # [N,X,J]
    mine = jnp.take_along_axis(here, first, axis=-1)
    local = indices[:, None, :] - (jnp.arange(ep) * n_local)[None, :, None]
    ids = jnp.where(mine, jnp.take_along_axis(local, first, axis=-1), n_local)
    gates = jnp.where(mine, jnp.take_along_axis(jnp.broadcast_to(weights[:, None, :], (N, ep, K)), first, -1), 0.0)
    pad_ids = jnp.concatenate([ids, jnp.full((1, ep, J), n_local, ids.dtype)])
    pad_gates = jnp.concatenate([gates, jnp.zeros((1, ep, J), gates.dtype)])
    r = jnp.arange(ep)[:, None]
    return {
        "slot_token": slot_token,
        "ids": pad_ids[slot_token, r].astype(jnp.int32),
        "gates": pad_gates[slot_token, r].astype(jnp.float32),
        "counts": kept.sum(0).astype(jnp.int32),
        "dropped": (hit & ~kept).sum().astype(jnp.int32),
        "reach": hit.sum(-1),
    }


def moe_ep_local(x, weights, indices, w1, w2, w3, *, cfg: ModelConfig, impl: str = "default",
                 scales=(None,) * 3):
    """The per-device body (expert axis manual). x [N,D], weights/indices [N,K] (global expert ids),
    w1/w3 [El,F,D], w2 [El,D,F] local -> y [N,D], this device's stats {ep_dropped [] int32,
    ep_shards [] f32}; the caller reduces them over the token-carrying axes."""
    N, D = x.shape
    ep = jax.sharding.get_abstract_mesh().shape[EXPERT_AXIS]
    El = w1.shape[0]
    dtype = jnp.dtype(cfg.dtype)
    cap = capacity(cfg, N, ep)
    plan = dispatch_plan(indices, weights, ep=ep, n_local=El, cap=cap)
    x_pad = jnp.concatenate([x.astype(dtype), jnp.zeros((1, D), dtype)])
    send = x_pad[plan["slot_token"]]  # [X,U,D]
    recv_counts = lax.all_to_all(plan["counts"], EXPERT_AXIS, 0, 0, tiled=True)
    sizes = (plan["counts"], recv_counts) if cfg.ep_transport == "ragged_all_to_all" else None
    meta = lambda a: lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)  # noqa: E731  (ids, gates: tiny)
    got = transfer(send, sizes, cfg.ep_dispatch, cfg.ep_combine, EXPERT_AXIS)
    valid = jnp.arange(cap)[None, :] < recv_counts[:, None]  # [X,U]: padding slots carry nothing
    ids = jnp.where(valid[..., None], meta(plan["ids"]), El)
    # each slot's expert outputs summed with their gate weights on the expert side: one vector
    # per (token, shard) goes back
    y_slots = routed_experts(got.reshape(ep * cap, D), meta(plan["gates"]).reshape(ep * cap, -1),
                             ids.reshape(ep * cap, -1), w1, w2, w3, dtype=dtype, impl=impl, scales=scales,
                             pow2_scale=cfg.fp8_act_scale == "ue8m0").reshape(ep, cap, D)
    back_sizes = None if sizes is None else (recv_counts, plan["counts"])
    back = transfer(y_slots, back_sizes, cfg.ep_combine, cfg.ep_dispatch, EXPERT_AXIS)  # [X,U,D] f32
    y = jnp.zeros((N + 1, D), jnp.float32).at[plan["slot_token"].reshape(-1)].add(back.reshape(-1, D))[:N]
    stats = {"ep_dropped": plan["dropped"], "ep_shards": plan["reach"].astype(jnp.float32).mean()}
    return y.astype(dtype), stats


def _batch_reduce(v, op):
    """Reduce over the token-carrying axes (tokens are sharded over every batch axis; never over
    the pipeline axis, whose devices run other micro-batches)."""
    axes = tuple(a for a in BATCH_AXES if a in _manual_axes())
    return op(v, axes) if axes else v


def _manual_axes() -> tuple[str, ...]:
    mesh = jax.sharding.get_abstract_mesh()
    return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Manual)


def moe_ep(x, weights, indices, w1, w2, w3, *, cfg: ModelConfig, impl: str = "default", scales=(None,) * 3):
    """Expert-parallel routed experts on the ambient mesh. x [N,D], weights/indices [N,K],
    w1/w3 [E,F,D], w2 [E,D,F] (global views) -> y [N,D], stats {ep_dropped, ep_shards}: global
    when this opens the shard_map, per device when called inside a region already manual over the
    expert axis (the pipeline reduces them itself)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        raise ConfigError(f"ModelConfig.moe_impl='ep' needs a mesh with an {EXPERT_AXIS!r} axis in context: "
                         "run under `jax.set_mesh(mesh)` (train.py does) or inside a shard_map over it")
    run = functools.partial(moe_ep_local, cfg=cfg, impl=impl)
    manual = set(_manual_axes())
    if EXPERT_AXIS in manual:
        return run(x, weights, indices, w1, w2, w3, scales=scales)
    free = [a for a in mesh.axis_names if a not in manual]
    batch = tuple(a for a in BATCH_AXES if a in free)  # size-1 axes too: keeps the VMA types simple
    split = x.shape[0] % math.prod(mesh.shape[a] for a in batch) == 0
    # Too few tokens to split (a batch-1 sample): every device routes all of them; the outputs are
    # then identical on every device of the batch axes, and the pmean only states that to JAX.
    tok = P(batch or None) if split else P()
    exp = P(EXPERT_AXIS)
    has_scales = scales[0] is not None  # FP8-stored weights: [E, out/128, in/128] scales ride along

    def body(x, weights, indices, w1, w2, w3, *s):
        if not split:
            x, weights, indices = (lax.pcast(v, batch, to="varying") for v in (x, weights, indices))
        y, st = run(x, weights, indices, w1, w2, w3, scales=tuple(s) if has_scales else (None,) * 3)
        if not split:
            same = {k: lax.pmean(v.astype(jnp.float32), batch).astype(v.dtype) for k, v in st.items()}
            return lax.pmean(y, batch), same
        return y, {"ep_dropped": _batch_reduce(st["ep_dropped"], lax.psum),
                   "ep_shards": _batch_reduce(st["ep_shards"], lax.pmean)}

    f = jax.shard_map(body, in_specs=(tok, tok, tok) + (exp,) * (6 if has_scales else 3),
                      out_specs=(tok, {"ep_dropped": P(), "ep_shards": P()}), axis_names=set(free))
    return f(x, weights, indices, w1, w2, w3, *(scales if has_scales else ()))
