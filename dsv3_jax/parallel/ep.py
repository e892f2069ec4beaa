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
     `dropped` (token-shard pairs whose expert outputs are lost). The buffer is built from the
     N rows already encoded for the wire (the formats are row-wise), never in the compute dtype.
  3. dispatch: `lax.all_to_all` of the buffer (portable; XLA:CPU has no ragged-all-to-all), or
     `lax.ragged_all_to_all` with the same layout that sends only the filled slots (GPU/TPU).
     Activations travel in `ep_dispatch` format (default FP8 E4M3 with pow2 1x128 scales).
  4. local experts: the received slots expand to [X U J] rows, sorted by local expert, through
     `experts.routed_experts` (the same grouped GEMMs as the local path); each slot's rows are summed
     with their gate weights on the expert side, so the combine sends one vector per token-shard.
     With `ep_chunks` != 1 this runs as a scan over chunks of source shards, each chunk
     rematerialised in the backward: dropless (U = N) costs X N J rows of workspace in one pass,
     U J per source in chunks.
  5. combine: the reverse all-to-all in `ep_combine` format (default BF16: the slots leave the
     expert side in BF16 when no wire format is finer, `slot_dtype`), then a float32 scatter-add
     of each shard's partial output onto the token.
Both transfers are `custom_vjp`s (`dispatch`, `combine`): the backward of dispatch moves gradients
in the combine format and the backward of combine in the dispatch format (DeepSeek: backward
combine BF16, the gradient before the down-projection FP8).

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


def _reverse(sizes):
    return None if sizes is None else (sizes[1], sizes[0])


def _slots(payload, slot_token):
    """Token rows -> the [X, U, ...] send buffer: slot (r, u) holds row slot_token[r, u]."""
    return tuple(p[slot_token] for p in payload)


# The two transfers are custom_vjps over token rows [N+1, D] (row N: zeros, the empty slots' row)
# and the slot table, not over a gathered [X, U, D] buffer: every wire format encodes row by row
# (1x128 tiles along D), so encoding the N+1 rows and then gathering the payload into slots gives
# the same bytes as gathering first, without the [X, U, D] copy in the compute dtype and its f32
# quantization workspace (dropless: X N rows). The gradient of the combine is gathered the same
# way, already in FP8. sizes: None for the fixed-capacity all_to_all, or (send [X], recv [X])
# int32 slot counts for ragged_all_to_all. The empty residuals x[:, :0] / y[:0] carry dtype, row
# count and varying axes (a fresh jnp.zeros would vary over no mesh axis inside a shard_map).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dispatch(x, slot_token, sizes, fwd_fmt: str, bwd_fmt: str, axis: str):
    """Token rows x [N+1, D] -> the slots this shard receives [X, U, D] in x.dtype, moved in
    `fwd_fmt`; the gradient travels back in `bwd_fmt` and is summed onto the rows in x.dtype."""
    return wire.decode(_move(_slots(wire.encode(x, fwd_fmt), slot_token), axis, sizes), fwd_fmt, x.dtype)


def _dispatch_fwd(x, slot_token, sizes, fwd_fmt, bwd_fmt, axis):
    return dispatch(x, slot_token, sizes, fwd_fmt, bwd_fmt, axis), (slot_token, sizes, x[:, :0])


def _dispatch_bwd(fwd_fmt, bwd_fmt, axis, res, ct):
    slot_token, sizes, like = res
    g = wire.decode(_move(wire.encode(ct, bwd_fmt), axis, _reverse(sizes)), bwd_fmt, like.dtype)
    D = ct.shape[-1]
    dx = jnp.zeros_like(like, shape=(like.shape[0], D)).at[slot_token.reshape(-1)].add(g.reshape(-1, D))
    return dx, None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def combine(y, slot_token, sizes, n_rows: int, fwd_fmt: str, bwd_fmt: str, axis: str):
    """This shard's outputs per received slot y [X, U, D] -> [n_rows, D] f32 on the source shards:
    moved in `fwd_fmt` (sizes as the forward move sees them), each slot added onto its token row
    in f32. The gradient leaves the f32 rows in `bwd_fmt` (one rounding) and arrives as y.dtype."""
    back = wire.decode(_move(wire.encode(y, fwd_fmt), axis, sizes), fwd_fmt, jnp.float32)
    D = y.shape[-1]
    return jnp.zeros_like(back, shape=(n_rows, D)).at[slot_token.reshape(-1)].add(back.reshape(-1, D))


def _combine_fwd(y, slot_token, sizes, n_rows, fwd_fmt, bwd_fmt, axis):
    return combine(y, slot_token, sizes, n_rows, fwd_fmt, bwd_fmt, axis), (slot_token, sizes, y[:0])


def _combine_bwd(n_rows, fwd_fmt, bwd_fmt, axis, res, ct):
    slot_token, sizes, like = res
    g = _move(_slots(wire.encode(ct, bwd_fmt), slot_token), axis, _reverse(sizes))
    return wire.decode(g, bwd_fmt, like.dtype), None, None


combine.defvjp(_combine_fwd, _combine_bwd)


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
    recv_counts = lax.all_to_all(plan["counts"], EXPERT_AXIS, 0, 0, tiled=True)
    sizes = (plan["counts"], recv_counts) if cfg.ep_transport == "ragged_all_to_all" else None
    meta = lambda a: lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)  # noqa: E731  (ids, gates: tiny)
    got = dispatch(x_pad, plan["slot_token"], sizes, cfg.ep_dispatch, cfg.ep_combine, EXPERT_AXIS)  # [X,U,D]
    valid = jnp.arange(cap)[None, :] < recv_counts[:, None]  # [X,U]: padding slots carry nothing
    ids = jnp.where(valid[..., None], meta(plan["ids"]), El)
    # each slot's expert outputs summed with their gate weights on the expert side: one vector
    # per (token, shard) goes back
    y_slots = expert_slots(got, meta(plan["gates"]), ids, (w1, w2, w3), cfg=cfg, impl=impl, scales=scales)
    y = combine(y_slots, plan["slot_token"], _reverse(sizes), N + 1, cfg.ep_combine, cfg.ep_dispatch,
                EXPERT_AXIS)[:N]
    stats = {"ep_dropped": plan["dropped"], "ep_shards": plan["reach"].astype(jnp.float32).mean()}
    return y.astype(dtype), stats


def slot_dtype(cfg: ModelConfig):
    """dtype of the expert side's per-slot outputs: the compute dtype where both wire formats are
    ones it holds exactly (BF16 combine; the gradient in FP8 with pow2 scales or BF16), as DeepSeek
    combines in BF16, else float32 (fp32 and LogFMT wires see the same values as before)."""
    exact = ("bf16", "fp8")
    return jnp.dtype(cfg.dtype) if cfg.ep_combine in exact and cfg.ep_dispatch in exact else jnp.dtype(jnp.float32)


def expert_chunks(cfg: ModelConfig, ep: int) -> int:
    """How many sequential chunks of source shards the received slots are processed in."""
    n = ep if cfg.ep_chunks == 0 else cfg.ep_chunks
    if ep % n:
        raise ConfigError(f"ModelConfig.ep_chunks={cfg.ep_chunks} must divide the expert-parallel degree {ep}")
    return n


def expert_slots(got, gates, ids, w, *, cfg: ModelConfig, impl: str, scales=(None,) * 3):
    """The local experts on the received slots: got [X,U,D], gates [X,U,J] f32, ids [X,U,J] local
    expert ids (El: none), w = (w1, w2, w3) local -> [X,U,D] in `slot_dtype`: each slot's expert
    outputs summed with their gate weights.

    With `ep_chunks` != 1, a scan over chunks of source shards, each chunk under `jax.checkpoint`:
    the scan keeps no per-chunk residuals (its inputs are the slices of got, gates and ids) and
    the backward recomputes one chunk at a time, so the sorted rows, the SwiGLU hidden state and
    the grouped GEMMs' workspace exist for one chunk's U J rows per source only. Row by row the
    arithmetic is that of one pass. Trainable weights enter the scan in f32 so that the gradient
    sums over the chunks in f32 (as the one GEMM would), not in the weights' dtype.
    """
    X, U, D = got.shape
    out_dtype = slot_dtype(cfg)

    def chunk(x, g, i, *ws):
        rows = x.shape[0] * U
        y = routed_experts(x.reshape(rows, D), g.reshape(rows, -1), i.reshape(rows, -1), *ws,
                           dtype=jnp.dtype(cfg.dtype), impl=impl, scales=scales,
                           pow2_scale=cfg.fp8_act_scale == "ue8m0")
        return y.astype(out_dtype).reshape(x.shape)

    n = expert_chunks(cfg, X)
    if n == 1:
        return chunk(got, gates, ids, *w)
    if scales[0] is None:  # e4m3-stored weights (inference) have no gradient and stay as stored
        w = tuple(v.astype(jnp.float32) for v in w)
    body = jax.checkpoint(lambda xs: chunk(*xs, *w), prevent_cse=False)
    split = lambda a: a.reshape(n, X // n, *a.shape[1:])  # noqa: E731
    return lax.map(body, (split(got), split(gates), split(ids))).reshape(X, U, D)


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
