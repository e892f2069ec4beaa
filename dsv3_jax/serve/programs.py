"""The server's decode loop: several of `infer.programs.step` per dispatch.

Shape letters (the package legend): B batch (Bd decode slots), A drafted tokens per step (0 =
plain decoding), K most steps per dispatch.

Everything else the server compiles is `dsv3_jax.infer.programs`' own: `prefill` (one request,
its prompt padded to a bucket), `insert` (the prefilled row copied into its decode slot) and the
`step` the loop below runs. Those programs already take the sampling settings and the EOS id as
per-row arrays (`infer.sampling.RowSampling`, `eos` [B], -1 = ignore EOS), so a request with its
own temperature joins a running batch without a recompilation.

What the server adds is `decode`: up to K steps in one dispatch, a `lax.while_loop` over the step
that stops early once no row is active, returning every step's tokens [K, Bd, A+1] to be read
back together. On a server the host work between steps (reading tokens back, detokenising,
handing text to the HTTP side) is otherwise paid once per step; in the loop it is paid once per
K steps, and the loop bound `n_steps` is an argument (K is the static buffer size), so one
compiled program serves both "one step, then let a waiting request join" and "K steps". A
`while_loop` rather than K separately dispatched steps: nothing crosses back to the host in
between, and the early exit saves the steps a finished batch would waste.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dsv3_jax.cache import Cache, cache_shardings
from dsv3_jax.infer.programs import DecodeState, Join, ModelDef, constrain, step
from dsv3_jax.infer.sampling import RowSampling


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
        # infer's jitted step, traced inline here (its donation applies only to a dispatch of its own).
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
def copy_row(dst: Cache, src: Cache, dst_row, src_row, *, mesh: Mesh | None = None) -> Cache:
    """Row src_row of every latent cache of `src` (all T positions, main and MTP) into row dst_row
    of `dst`: the prefix pool's save and restore (`DecodeBatch`; one program per direction)."""
    def put(d, s):
        row = jax.lax.dynamic_index_in_dim(s, src_row, axis=1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(d, row.astype(d.dtype), dst_row, axis=1)

    out = jax.tree.map(put, dst, src)
    return constrain(out, None if mesh is None else cache_shardings(out, mesh))

