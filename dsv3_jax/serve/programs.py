"""The server's compiled programs: prefill, and a decode loop of several steps per dispatch.

Shape letters (the package legend): B batch (Bp prefill rows, Bd decode slots), S prompt bucket,
T cache slots, A drafted tokens per step (0 = plain decoding), K most steps per dispatch,
D `dim`, V vocabulary.

These are `dsv3_jax.infer.programs`' prefill and step with two changes a server needs:

* Sampling settings and the EOS id are per-row arrays (`serve.sampling.RowSampling`, `eos` [B],
  -1 = ignore EOS), not compile-time constants, so a request with its own temperature joins a
  running batch without a recompilation.
* `decode` runs up to K steps in one dispatch: a `lax.while_loop` over the step body that stops
  early once no row is active, and returns every step's tokens [K, Bd, A+1] to be read back
  together. On a server the host work between steps (reading tokens back, detokenising,
  handing text to the HTTP side) is otherwise paid once per step; in the loop it is paid once
  per K steps, and the loop bound `n_steps` is an argument (K is the static buffer size), so one
  compiled program serves both "one step, then let a waiting request join" and "K steps".
  A `while_loop` rather than K separately dispatched steps: nothing crosses back to the host
  in between, and the early exit saves the steps a finished batch would waste.

The state is `infer.programs.DecodeState` and the hand-off is `infer.programs.insert` (a prefilled
row copied into its decode slot), so the cache layout and the MTP window logic are shared with
`infer`. MTP drafting here keeps the draft distribution q for every row (greedy rows: one-hot),
because any row may be sampled.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dsv3_jax.cache import Cache, init_cache
from dsv3_jax.infer.programs import (DecodeState, StepOutput, _finish, _write_ring, constrain,
                                     state_shardings_for)
from dsv3_jax.infer.sampling import DRAFT, TARGET, token_keys
from dsv3_jax.infer.speculative import ring_size
from dsv3_jax.serve import sampling
from dsv3_jax.serve.sampling import RowSampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ChunkOutput:
    """K steps' results (rows of steps not run are zero)."""

    tokens: jax.Array  # [K,B,A+1] new tokens; the first `count` of each step are emitted
    count: jax.Array  # [K,B] int32
    accepted: jax.Array  # [K,B] int32 drafts accepted
    was_active: jax.Array  # [K,B] bool
    steps: jax.Array  # [] int32: steps run (<= n_steps)
    active: jax.Array  # [B] bool after the last step
    remaining: jax.Array  # [B] int32 after the last step


def draft(model, cache: Cache, tokens, h_main, wpos, length, seq_ids, key, rs: RowSampling, *, form: str):
    """`infer.speculative.draft` with per-row sampling: the MTP chain over the window wpos [B,W]
    drafts d_1..d_A at length+1.. -> (cache, tokens with the drafts stored, q [B,A,V])."""
    last = (length - 1 - wpos[:, 0])[:, None, None]  # window column of position length-1
    rows = jnp.arange(tokens.shape[0])
    qs, drafted = [], tokens

    def after_depth(k, h, tokens):
        """After module k: d_k from its logits at position length-1, stored at length+k (module
        k+1 reads it there); the buffer after the last module is the one the step keeps."""
        nonlocal drafted
        logits = model.logits(jnp.take_along_axis(h, last, axis=1), model.mtp[k - 1].norm)[:, 0]
        pos = length + k
        qs.append(sampling.probabilities(logits, rs))
        d = sampling.sample(logits, token_keys(key, seq_ids, pos, DRAFT), rs)
        drafted = tokens.at[rows, pos].set(d, mode="drop")
        return drafted

    ctx = model.context(wpos, kv_len=cache.slots)
    _, _, mtp = model.mtp_chain(h_main, tokens, ctx, cache.mtp, depth=len(cache.mtp), form=form,
                                after_depth=after_depth)
    return Cache(layers=cache.layers, mtp=mtp), drafted, jnp.stack(qs, axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_draft", "cache_dtype", "mesh"))
def prefill(graphdef, params, prompt, lengths, seq_ids, budget, eos, rs: RowSampling, key, *, n_draft: int,
            cache_dtype, mesh: Mesh | None = None) -> tuple[DecodeState, StepOutput]:
    """prompt [B,S] right-padded, lengths [B], budget [B], eos [B] -> a state with an S-slot
    cache (ready for `infer.programs.insert`) and the first token of each row."""
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    B, S = prompt.shape
    cache = init_cache(cfg, B, S, cache_dtype, n_draft)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    h, cache = model.forward_cached(prompt, positions, cache, form="expanded")
    h_last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
    first = sampling.sample(model.logits(h_last)[:, 0], token_keys(key, seq_ids, lengths, TARGET), rs)
    rows = jnp.arange(B)
    tokens = jnp.zeros((B, S + n_draft + 1), jnp.int32).at[:, :S].set(prompt).at[rows, lengths].set(first)
    hidden = q = None
    if n_draft:
        hn = model.norm(h)
        hidden = _write_ring(jnp.zeros((B, ring_size(n_draft), cfg.dim), hn.dtype), positions, hn,
                             lengths - ring_size(n_draft), lengths)
        cache, tokens, q = draft(model, cache, tokens, hn, positions, lengths, seq_ids, key, rs, form="expanded")
    out = StepOutput(first[:, None], jnp.ones_like(lengths), jnp.zeros_like(lengths), budget > 0)
    out, remaining, active = _finish(out, budget > 0, budget, eos[:, None])
    state = DecodeState(cache, tokens, lengths, seq_ids, remaining, active, hidden, q)
    return constrain(state, state_shardings_for(state, mesh)), out


def step(model, state: DecodeState, rs: RowSampling, eos, key, n_draft: int) -> tuple[DecodeState, StepOutput]:
    """One verification of every row (`infer.programs.step`'s body with per-row sampling and EOS)."""
    B, Tb = state.tokens.shape
    rows = jnp.arange(B)[:, None]
    positions = state.length[:, None] + jnp.arange(n_draft + 1, dtype=jnp.int32)
    fed = jnp.take_along_axis(state.tokens, jnp.minimum(positions, Tb - 1), axis=1)
    h, cache = model.forward_cached(fed, positions, state.cache, form="absorbed")
    a, new = sampling.verify(model.logits(h), fed[:, 1:], state.draft_probs, state.length, state.seq_id, key, rs)
    out, remaining, active = _finish(StepOutput(new, a + 1, a, state.active), state.active, state.remaining,
                                     eos[:, None])
    # Frozen (inactive) rows keep their length and tokens, so they recompute the same thing.
    keep = state.active[:, None]
    tokens = state.tokens.at[rows, jnp.where(keep, positions + 1, Tb)].set(new, mode="drop")
    length = jnp.where(state.active, state.length + a + 1, state.length)
    hidden, q = state.hidden, state.draft_probs
    if n_draft:
        hidden = _write_ring(hidden, positions, model.norm(h), state.length, state.length + n_draft + 1)
        W = 2 * n_draft
        wpos = length[:, None] - W + jnp.arange(W, dtype=jnp.int32)
        h_win = jnp.take_along_axis(hidden, (wpos % hidden.shape[1])[..., None], axis=1)
        cache, tokens, q = draft(model, cache, tokens, h_win, wpos, length, state.seq_id, key, rs, form="absorbed")
    return DecodeState(cache, tokens, length, state.seq_id, remaining, active, hidden, q), out


@functools.partial(jax.jit, static_argnames=("graphdef", "n_draft", "max_steps", "mesh"), donate_argnums=(2,))
def decode(graphdef, params, state: DecodeState, keep, n_steps, rs: RowSampling, eos, key, *, n_draft: int,
           max_steps: int, mesh: Mesh | None = None) -> tuple[DecodeState, ChunkOutput]:
    """Up to n_steps (<= max_steps) verification steps on the device, stopping once no row is active.

    keep [B] bool: rows the host let go (a stop string, a closed connection) are deactivated first.
    """
    state = dataclasses.replace(state, active=state.active & keep)
    B, A1 = state.tokens.shape[0], n_draft + 1
    zeros = jnp.zeros((max_steps, B), jnp.int32)
    buf = (jnp.zeros((max_steps, B, A1), jnp.int32), zeros, zeros, jnp.zeros((max_steps, B), bool))

    def cond(carry):
        i, st, _ = carry
        return (i < n_steps) & jnp.any(st.active)

    def body(carry):
        i, st, buf = carry
        st, out = step(nnx.merge(graphdef, params), st, rs, eos, key, n_draft)
        st = constrain(st, state_shardings_for(st, mesh))
        buf = tuple(b.at[i].set(x) for b, x in zip(buf, (out.tokens, out.count, out.accepted, out.was_active)))
        return i + 1, st, buf

    steps, state, buf = jax.lax.while_loop(cond, body, (jnp.int32(0), state, buf))
    return state, ChunkOutput(*buf, steps=steps, active=state.active, remaining=state.remaining)
