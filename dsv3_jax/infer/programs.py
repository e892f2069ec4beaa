"""The compiled inference programs: prefill, insert (the cache hand-off) and the decode step.

Shape letters (the package legend): B batch, S prompt length (padded), T cache slots, Tb
token-buffer length, A drafted tokens per step (0 = plain decoding), K most steps per dispatch,
D `dim`, V vocabulary.

Prefill and decode are separate jitted programs with their own batch sizes and, optionally, their
own meshes (prefill/decode disaggregation): `prefill` runs Bp prompts and returns a `DecodeState`
whose cache has only S slots; `insert` moves it (a device_put to the decode mesh first) into
slots [slot, slot+Bp) of the decode batch's state; `step` advances all Bd sequences by one
verification, and `decode` runs up to K steps in one dispatch. Shapes never depend on lengths
or positions, which are arrays, and neither does the program depend on the sampling settings or
the EOS id, which are arrays too (per row: `sampling.RowSampling` [B], `eos_id` [] or [B]), so
each program compiles once per (batch, S or T, A). The programs take the model as (`ModelDef`, parameter leaves) from `split`: the same
parameter arrays as the `Transformer`. `Engine` (engine.py) drives them with one setting for every row;
the server (`dsv3_jax.serve`) gives each row its own and lets prompts join between dispatches.

`decode` is a `lax.while_loop` over `step` that stops early once no row is active, returning every
step's tokens [K, B, A+1] to be read back together. The host work between steps (reading tokens
back, bookkeeping, on a server detokenising and handing text to the HTTP side) is otherwise paid
once per step, on a CPU backend out of the same cores the step runs on; in the loop it is paid once
per K steps. The loop bound `n_steps` is an argument (K the static buffer size), so one compiled
program serves both "one step, then let a waiting request join" and "K steps".

A plain decode step is the speculative step with A = 0: the main model runs over the one pending
token, and the "bonus" token is the sampled next token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dsv3_jax.cache import Cache, cache_shardings, init_cache
from dsv3_jax.infer.sampling import TARGET, RowSampling, sample, token_keys
from dsv3_jax.infer.speculative import draft, ring_size, verify
from dsv3_jax.sharding import RULES, logical_to_spec, state_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything a batch of sequences carries between steps (a pytree; batch is axis 0, or 1 in the cache)."""

    cache: Cache
    tokens: jax.Array  # [B,Tb] int32: prompt, generated tokens, the pending one at `length`, drafts
    length: jax.Array  # [B] int32: main-cache slots written = position of the pending token
    seq_id: jax.Array  # [B] int32: prompt index, for the sampling keys
    remaining: jax.Array  # [B] int32: tokens the sequence may still emit
    active: jax.Array  # [B] bool: still generating (frozen once done)
    hidden: jax.Array | None  # [B,4A,D] main normalised hidden states by position mod 4A (A > 0)
    draft_probs: jax.Array | None  # [B,A,V] q of the pending drafts (A > 0; one-hot for greedy rows)


class ModelDef:
    """The model's structure as one static argument of the programs: its nnx GraphDef and the
    treedef of its parameter leaves; the parameters travel as a flat list of arrays (`split`).

    Why not the GraphDef and the nnx State themselves: jit hashes every static argument on every
    call, and hashing a GraphDef walks the module graph (~0.6 ms on the decode benchmark's 4-layer
    model), and an nnx State flattens through Python (~0.1 ms), host time paid on each decode
    step. This hashes once and compares by identity first; a flat list flattens in C++.
    """

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, ModelDef) and self._hash == other._hash
                                 and (self.graphdef, self.treedef) == (other.graphdef, other.treedef))

    def merge(self, leaves):
        """The Transformer over these parameter leaves (inside a program)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def split(model, mesh: Mesh | None = None) -> tuple[ModelDef, list]:
    """model -> (ModelDef, its parameter leaves), placed on `mesh` by the logical-axis rules (the
    model's own arrays without a mesh)."""
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(place_params(params, mesh))
    return ModelDef(graphdef, treedef), leaves


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutput:
    tokens: jax.Array  # [B,A+1] new tokens; the first `count` are emitted
    count: jax.Array  # [B] int32 (0 for inactive sequences; stops after EOS and at the budget)
    accepted: jax.Array  # [B] int32 drafts accepted this step
    was_active: jax.Array  # [B] bool: active when the step began
    drafted: jax.Array | None = None  # [B] int32 MTP drafts verified (0: inactive, a joined row's placeholders)
    active: jax.Array | None = None  # [B] bool: after the step
    remaining: jax.Array | None = None  # [B] int32: after the step


def buckets(limit: int, first: int) -> list[int]:
    """first, 2 first, 4 first, ... below limit, then limit: log2(limit/first) shapes to compile
    instead of one per length."""
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


KV_BUCKET = 64  # the smallest attended prefix of the cache (`step`'s kv_len)


def kv_len_for(longest: int, T: int) -> int:
    """The smallest kv bucket of a T-slot cache holding positions < longest."""
    return next(b for b in buckets(T, KV_BUCKET) if b >= longest)


def token_buffer_len(max_len: int, n_draft: int) -> int:
    return max_len + 2 * n_draft + 2


def _finish(out: StepOutput, active, remaining, eos_id) -> tuple[StepOutput, jax.Array, jax.Array]:
    """Cut the emitted tokens at EOS (kept; eos_id [] or [B], -1: none) and at the budget; update
    remaining and active."""
    idx = jnp.arange(out.tokens.shape[1])[None, :]
    count = jnp.minimum(out.count, remaining)
    is_eos = (out.tokens == jnp.reshape(eos_id, (-1, 1))) & (idx < count[:, None])
    first_eos = jnp.argmax(is_eos, axis=1)
    hit = is_eos.any(axis=1)
    count = jnp.where(hit, first_eos + 1, count)
    count = jnp.where(active, count, 0)
    remaining = remaining - count
    active = active & ~hit & (remaining > 0)
    return dataclasses.replace(out, count=count, active=active, remaining=remaining), remaining, active


def _write_ring(hidden, positions, h, lo, hi):
    """Store h [B,S,D] at ring slots (position mod ring size) where lo <= position < hi (others dropped)."""
    R = hidden.shape[1]
    ok = (positions >= lo[:, None]) & (positions < hi[:, None])
    slots = jnp.where(ok, positions % R, R)
    return hidden.at[jnp.arange(h.shape[0])[:, None], slots].set(h.astype(hidden.dtype), mode="drop")


def constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


# ---- the programs ------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model_def", "n_draft", "cache_dtype", "mesh"))
def prefill(model_def: ModelDef, params, prompt, lengths, seq_ids, budget, key, eos_id, *, n_draft: int,
            sampling: RowSampling, cache_dtype, mesh: Mesh | None = None):
    """prompt [B,S] right-padded, lengths [B], budget [B] -> (DecodeState with an S-slot cache,
    StepOutput of the first token)."""
    model = model_def.merge(params)
    cfg = model.cfg
    B, S = prompt.shape
    cache = init_cache(cfg, B, S, cache_dtype, n_draft)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    h, cache = model.forward_cached(prompt, positions, cache, form="expanded")
    h_last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
    logits = model.logits(h_last)[:, 0]
    first = sample(logits, token_keys(key, seq_ids, lengths, TARGET), sampling)
    rows = jnp.arange(B)
    tokens = jnp.zeros((B, S + n_draft + 1), jnp.int32).at[:, :S].set(prompt).at[rows, lengths].set(first)
    hidden = q = None
    if n_draft:
        hn = model.norm(h)
        hidden = _write_ring(jnp.zeros((B, ring_size(n_draft), cfg.dim), hn.dtype), positions, hn,
                             lengths - ring_size(n_draft), lengths)
        cache, tokens, q = draft(model, cache, tokens, hn, positions, lengths, seq_ids, key, sampling,
                                 form="expanded")
    out = StepOutput(first[:, None], jnp.ones_like(lengths), jnp.zeros_like(lengths), budget > 0)
    out, remaining, active = _finish(out, budget > 0, budget, eos_id)
    state = DecodeState(cache, tokens, lengths, seq_ids, remaining, active, hidden, q)
    return constrain(state, state_shardings_for(state, mesh)), out


@functools.partial(jax.jit, static_argnames=("model_def", "n_draft", "chunk", "mesh", "kv_len"), donate_argnums=(2,))
def prefill_chunk(model_def: ModelDef, params, state: DecodeState, start, budget, key, eos_id, *, n_draft: int,
                  sampling: RowSampling, chunk: int, mesh: Mesh | None = None,
                  kv_len: int | None = None) -> tuple[DecodeState, StepOutput]:
    """Chunked prefill: positions start..start+chunk-1 of the prompts already in state.tokens
    (`chunk_state`: `length` holds each prompt's length; the cache has the decode batch's T slots).

    Run for start = 0, chunk, 2 chunk, ... while start < length: each chunk writes its latents
    (the main model's and, with drafting, each MTP module's, whose inputs at position j, the hidden
    state at j and token j+k, are known for every prompt position) and attends the cache prefix
    kv_len > start + chunk - 1. The chunk holding position length-1 also samples the first token,
    stores it at `length` and drafts, so that after it the state equals `prefill`'s (padded to T
    slots) and the StepOutput is the first token; before it, both are partial and unused. A long
    prompt thus enters the batch a chunk per scheduler turn instead of stalling every decoding row
    for its whole prefill."""
    model = model_def.merge(params)
    B, length = state.tokens.shape[0], state.length
    positions = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (B, chunk))
    toks = jax.lax.dynamic_slice_in_dim(state.tokens, start, chunk, axis=1)
    h, cache = model.forward_cached(toks, positions, state.cache, form="expanded", kv_len=kv_len)
    final = (length > start) & (length <= start + chunk)  # [B] this chunk holds position length-1
    h_last = jnp.take_along_axis(h, jnp.clip(length - 1 - start, 0, chunk - 1)[:, None, None], axis=1)
    first = sample(model.logits(h_last)[:, 0], token_keys(key, state.seq_id, length, TARGET), sampling)
    rows = jnp.arange(B)
    tokens = state.tokens.at[rows, jnp.where(final, length, state.tokens.shape[1])].set(first, mode="drop")
    hidden, q = state.hidden, state.draft_probs
    if n_draft:
        hn = model.norm(h)
        hidden = _write_ring(hidden, positions, hn, length - ring_size(n_draft), length)
        cache, drafted, q_new = draft(model, cache, tokens, hn, positions, length, state.seq_id, key, sampling,
                                      form="expanded", kv_len=kv_len)
        tokens = jnp.where(final[:, None], drafted, tokens)
        q = jnp.where(final[:, None, None], q_new, q)
    out = StepOutput(first[:, None], jnp.ones_like(length), jnp.zeros_like(length), budget > 0)
    out, remaining, active = _finish(out, budget > 0, budget, eos_id)
    new = DecodeState(cache, tokens, length, state.seq_id, remaining, active, hidden, q)
    return constrain(new, state_shardings_for(new, mesh)), out


def chunk_state(cfg, prompts: list[list[int]], seq_ids, max_len: int, *, n_draft: int, cache_dtype,
                mesh: Mesh | None = None) -> DecodeState:
    """The state `prefill_chunk` fills: an empty T = max_len-slot batch with the prompts in their
    token buffers and their lengths (rows inactive until their last chunk)."""
    state = empty_state(cfg, len(prompts), max_len, n_draft=n_draft, cache_dtype=cache_dtype,
                        hidden_dtype=jnp.dtype(cfg.dtype))
    buf = np.zeros(state.tokens.shape, np.int32)
    for r, p in enumerate(prompts):
        buf[r, : len(p)] = p
    state = dataclasses.replace(state, tokens=jnp.asarray(buf), length=jnp.asarray([len(p) for p in prompts], jnp.int32),
                                seq_id=jnp.asarray(seq_ids, jnp.int32))
    return place(state, mesh)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Join:
    """A prompt chunk that rides in a decode step (Sarathi's mixed batch): J prompt tokens become J
    more rows of the step's forward, sharing every weight read with the decoding rows, instead of
    a prefill dispatch of its own that the decoding rows wait for.

    The chunk holds positions start..start+J-1 of a prompt of `length` tokens joining decode row
    `slot` (free, inactive). The step makes that row's pending token position
    p = min(start + J, length - 1) (`pending`: the prompt's token there) and writes the chunk's
    latents below p (pads, at or past p, write nothing). When p = length - 1 (the final chunk) the
    row becomes active and its decode row samples the first token exactly as every other row
    samples its next: same key, same settings (row `slot` of the step's sampling arrays, which
    the caller sets first). Before that the row stays inactive and the next chunk starts at p,
    overwriting the one latent the inactive row wrote there.

    With A = n_draft MTP modules, `tokens` also holds the A prompt tokens after the chunk (module
    k at position j reads token j + k), the chunk fills the row's MTP caches and its hidden-state
    ring too (`fill`), and the row's first verification checks A placeholder drafts (token 0,
    drawn from a one-hot q: the rejection rule stays exact, greedy rows just match or not)."""

    tokens: jax.Array  # [J+A] int32: prompt[start:start+J+A], right-padded
    slot: jax.Array  # [] int32
    start: jax.Array  # [] int32
    length: jax.Array  # [] int32: the whole prompt's
    pending: jax.Array  # [] int32: prompt[min(start + J, length - 1)]
    seq_id: jax.Array  # [] int32
    budget: jax.Array  # [] int32: tokens the request may emit

    def pending_at(self, n_draft: int) -> jax.Array:
        """p: the position of the row's pending token."""
        return jnp.minimum(self.start + self.tokens.shape[0] - n_draft, self.length - 1)

    def enter(self, state: DecodeState, n_draft: int) -> DecodeState:
        """The state with the joining row pending at p (active if this is the final chunk)."""
        p, i, Tb = self.pending_at(n_draft), self.slot, state.tokens.shape[1]
        final = p == self.length - 1
        at = self.start + jnp.arange(self.tokens.shape[0])
        tokens = state.tokens.at[i, jnp.where(at < self.length, at, Tb)].set(self.tokens, mode="drop")
        tokens = tokens.at[i, p].set(self.pending)
        q = state.draft_probs
        if n_draft:  # placeholder drafts for the first verification
            tokens = tokens.at[i, jnp.where(final, p + 1 + jnp.arange(n_draft), Tb)].set(0, mode="drop")
            q = q.at[i].set(jax.nn.one_hot(jnp.zeros(n_draft, jnp.int32), q.shape[-1], dtype=q.dtype))
        return dataclasses.replace(
            state, length=state.length.at[i].set(p), tokens=tokens, draft_probs=q,
            seq_id=state.seq_id.at[i].set(self.seq_id), remaining=state.remaining.at[i].set(self.budget),
            active=state.active.at[i].set(final & (self.budget > 0)))

    def rows(self, n_draft: int) -> tuple[jax.Array, jax.Array]:
        """The chunk as rows as wide as the decoding rows (A + 1 tokens; J must divide): tokens and
        positions [J/(A+1), A+1] (-1 for those not written)."""
        J = self.tokens.shape[0] - n_draft
        positions = self.start + jnp.arange(J, dtype=jnp.int32)
        positions = jnp.where(positions < self.pending_at(n_draft), positions, -1)
        return self.tokens[:J].reshape(-1, n_draft + 1), positions.reshape(-1, n_draft + 1)

    def fill(self, model, hidden, cache: Cache, tokens, h, positions, n_draft: int, kv_len: int | None):
        """What drafting reads of the chunk: its normalised hidden states (h: its rows') in the row's ring
        (the 2A positions below p, all a draft window reaches back to) and its MTP latents (each
        module over the chunk's positions, reading the tokens ahead from the row's buffer)
        -> (hidden, cache)."""
        J, D, p = self.tokens.shape[0] - n_draft, h.shape[-1], self.pending_at(n_draft)
        h, positions = h.reshape(J, 1, D), positions.reshape(J, 1)  # one token per row: tokens ahead by row
        hn = model.norm(h)
        row = _write_ring(hidden[self.slot][None], positions.reshape(1, J), hn.reshape(1, J, D),
                          (p - 2 * n_draft)[None], p[None])
        ctx = model.context(positions, kv_len=kv_len or cache.slots, join=(self.slot, J))
        _, _, mtp = model.mtp_chain(hn, jnp.broadcast_to(tokens[self.slot], (J, tokens.shape[1])), ctx, cache.mtp,
                                    depth=len(cache.mtp), form="absorbed")
        return hidden.at[self.slot].set(row[0]), Cache(layers=cache.layers, mtp=mtp)


@functools.partial(jax.jit, static_argnames=("model_def", "n_draft", "mesh", "kv_len"), donate_argnums=(2,))
def step(model_def: ModelDef, params, state: DecodeState, key, eos_id, *, n_draft: int, sampling: RowSampling,
         mesh: Mesh | None = None, kv_len: int | None = None,
         join: Join | None = None) -> tuple[DecodeState, StepOutput]:
    """Verify [pending, d_1..d_A] at positions length..length+A, accept, draft the next A.

    kv_len (one of `kv_buckets`; default all T): attend over the cache's first kv_len slots only,
    which must exceed length + A of every active row (frozen rows compute garbage, never read).
    Attention then costs what the sequences hold, not what the slots could: a server sized for
    4096-token requests does not read 4096 slots per row and step for 200-token ones.
    join: a prompt chunk joining a free row in this step (`Join`)."""
    model = model_def.merge(params)
    B, Tb = state.tokens.shape
    rows = jnp.arange(B)[:, None]
    state = state if join is None else join.enter(state, n_draft)
    positions = state.length[:, None] + jnp.arange(n_draft + 1, dtype=jnp.int32)
    fed = jnp.take_along_axis(state.tokens, jnp.minimum(positions, Tb - 1), axis=1)
    if join is None:
        h, cache = model.forward_cached(fed, positions, state.cache, form="absorbed", kv_len=kv_len)
    else:
        chunk, chunk_pos = join.rows(n_draft)
        h, cache = model.forward_cached(jnp.concatenate([fed, chunk]), jnp.concatenate([positions, chunk_pos]),
                                        state.cache, form="absorbed", kv_len=kv_len, join=(join.slot, chunk.shape[0]))
        h, h_chunk = h[:B], h[B:]
    logits = model.logits(h)  # [B,A+1,V]
    a, new = verify(logits, fed[:, 1:], state.draft_probs, state.length, state.seq_id, key, sampling)
    drafted = jnp.where(state.active, n_draft, 0)
    if join is not None:  # its first verification checks placeholders: not MTP's drafts
        drafted = drafted.at[join.slot].set(0)
    out, remaining, active = _finish(StepOutput(new, a + 1, a, state.active, drafted), state.active,
                                     state.remaining, eos_id)
    # Frozen (inactive) rows keep their length and tokens, so they recompute the same thing.
    keep = state.active[:, None]
    tokens = state.tokens.at[rows, jnp.where(keep, positions + 1, Tb)].set(new, mode="drop")
    length = jnp.where(state.active, state.length + a + 1, state.length)
    hidden, q = state.hidden, state.draft_probs
    if n_draft:
        if join is not None:
            hidden, cache = join.fill(model, hidden, cache, tokens, h_chunk, chunk_pos, n_draft, kv_len)
        hidden = _write_ring(hidden, positions, model.norm(h), state.length, state.length + n_draft + 1)
        W = 2 * n_draft
        wpos = length[:, None] - W + jnp.arange(W, dtype=jnp.int32)
        h_win = jnp.take_along_axis(hidden, (wpos % hidden.shape[1])[..., None], axis=1)
        cache, tokens, q = draft(model, cache, tokens, h_win, wpos, length, state.seq_id, key, sampling,
                                 form="absorbed", kv_len=kv_len)
    new_state = DecodeState(cache, tokens, length, state.seq_id, remaining, active, hidden, q)
    return constrain(new_state, state_shardings_for(new_state, mesh)), out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ChunkOutput:
    """K steps' results (rows of steps not run are zero)."""

    tokens: jax.Array  # [K,B,A+1] new tokens; the first `count` of each step are emitted
    count: jax.Array  # [K,B] int32
    accepted: jax.Array  # [K,B] int32 drafts accepted
    was_active: jax.Array  # [K,B] bool
    drafted: jax.Array  # [K,B] int32 MTP drafts verified (`StepOutput.drafted`)
    steps: jax.Array  # [] int32: steps run (<= n_steps)
    active: jax.Array  # [B] bool after the last step
    remaining: jax.Array  # [B] int32 after the last step

    def emitted(self, slot: int) -> list[int]:
        """The tokens `slot` emitted over the steps run, in order (on the host's numpy copy)."""
        return [t for s in range(int(self.steps)) for t in self.tokens[s, slot, : self.count[s, slot]].tolist()]

    def drafts(self) -> tuple[int, int]:
        """(MTP drafts verified, of them accepted) over the steps run (on the host's numpy copy)."""
        return int(self.drafted.sum()), int(self.accepted[self.drafted > 0].sum())


@functools.partial(jax.jit, static_argnames=("model_def", "n_draft", "max_steps", "mesh", "kv_len"),
                   donate_argnums=(2,))
def decode(model_def: ModelDef, params, state: DecodeState, keep, n_steps, rs: RowSampling, eos, key, *, n_draft: int,
           max_steps: int, mesh: Mesh | None = None, kv_len: int | None = None,
           joins: Join | None = None, has_join=None) -> tuple[DecodeState, ChunkOutput]:
    """Up to n_steps (<= max_steps) verification steps on the device, stopping once no row is active
    and no prompt chunk is left to join.

    keep [B] bool: rows the host let go (a stop string, a closed connection) are deactivated first.
    kv_len: the cache prefix every step attends (infer's `step`); it must hold all n_steps.
    joins, has_join [max_steps] bool: step i carries prompt chunk joins[i] (`infer.programs.Join`
    with a leading step axis: Sarathi's mixed batch) where has_join[i]; a row whose last chunk
    rides in step i emits its first token in it and decodes in the steps after.
    """
    state = dataclasses.replace(state, active=state.active & keep)
    B, A1 = state.tokens.shape[0], n_draft + 1
    zeros = jnp.zeros((max_steps, B), jnp.int32)
    buf = (jnp.zeros((max_steps, B, A1), jnp.int32), zeros, zeros, jnp.zeros((max_steps, B), bool), zeros)

    def run(st, join=None):
        # the jitted step, traced inline here (its donation applies only to a dispatch of its own).
        return step(model_def, params, st, key, eos, n_draft=n_draft, sampling=rs, mesh=mesh, kv_len=kv_len, join=join)

    def body(carry):
        i, st, buf = carry
        if joins is None:
            st, out = run(st)
        else:
            st, out = jax.lax.cond(has_join[i], lambda st: run(st, jax.tree.map(lambda x: x[i], joins)), run, st)
        buf = tuple(b.at[i].set(x) for b, x in zip(buf, (out.tokens, out.count, out.accepted, out.was_active, out.drafted)))
        return i + 1, st, buf

    def cond(carry):
        i, st, _ = carry
        more = jnp.any(st.active) if joins is None else jnp.any(st.active) | has_join[jnp.minimum(i, max_steps - 1)]
        return (i < n_steps) & more

    steps, state, buf = jax.lax.while_loop(cond, body, (jnp.int32(0), state, buf))
    return state, ChunkOutput(*buf, steps=steps, active=state.active, remaining=state.remaining)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=(0,))
def insert(dst: DecodeState, src: DecodeState, slot, *, mesh: Mesh | None = None) -> DecodeState:
    """Copy the Bp sequences of `src` (cache of S <= T slots) into rows slot..slot+Bp of `dst`."""
    def put(axis):
        def f(d, s):
            start = [0] * d.ndim
            start[axis] = slot
            return jax.lax.dynamic_update_slice(d, s.astype(d.dtype), start)
        return f

    cache = jax.tree.map(put(1), dst.cache, src.cache)
    rest = {f.name: jax.tree.map(put(0), getattr(dst, f.name), getattr(src, f.name))
            for f in dataclasses.fields(DecodeState) if f.name != "cache"}
    out = DecodeState(cache=cache, **rest)
    return constrain(out, state_shardings_for(out, mesh))


# ---- state allocation and sharding ---------------------------------------------------------------
def empty_state(cfg, batch: int, max_len: int, *, n_draft: int, cache_dtype, hidden_dtype) -> DecodeState:
    """A decode batch with no sequence in it (all rows inactive). With drafting it keeps the draft
    distributions q whatever the rows' settings: any row may sample."""
    def z():  # distinct buffers: the state is donated
        return jnp.zeros((batch,), jnp.int32)

    return DecodeState(
        cache=init_cache(cfg, batch, max_len, cache_dtype, n_draft),
        tokens=jnp.zeros((batch, token_buffer_len(max_len, n_draft)), jnp.int32),
        length=z(), seq_id=z(), remaining=z(), active=jnp.zeros((batch,), bool),
        hidden=jnp.zeros((batch, ring_size(n_draft), cfg.dim), hidden_dtype) if n_draft else None,
        draft_probs=jnp.zeros((batch, n_draft, cfg.vocab_size), jnp.float32) if n_draft else None,
    )


def place(state: DecodeState, mesh: Mesh | None) -> DecodeState:
    """A fresh state onto `mesh` (`state_shardings_for`), or committed to the default device without
    one, as every program's output is: jit keys its cache on committedness too, so an uncommitted
    fresh state would compile each program that takes it again once it meets a program's output."""
    if mesh is None:
        return jax.device_put(state, jax.devices()[0])
    return jax.device_put(state, state_shardings_for(state, mesh))


def state_shardings_for(state: DecodeState, mesh: Mesh | None):
    """Batch over the data-carrying axes (cache layers over `pipeline`); None without a mesh."""
    if mesh is None:
        return None
    rules = RULES + ((None, None),)

    def rows(x):
        return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules))

    rest = {f.name: jax.tree.map(rows, getattr(state, f.name))
            for f in dataclasses.fields(DecodeState) if f.name != "cache"}
    return DecodeState(cache=cache_shardings(state.cache, mesh), **rest)


def on_mesh(mesh: Mesh | None):
    """Run a program under its own mesh (a context; nothing without one): moe_impl="ep" opens its
    shard_map over the ambient mesh, and with disaggregation prefill and decode have different ones."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def place_params(params, mesh: Mesh | None):
    """The model's state on `mesh` by the logical-axis rules (the arrays themselves without a mesh)."""
    return params if mesh is None else jax.device_put(params, state_shardings(params, mesh))
