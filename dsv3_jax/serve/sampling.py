"""Per-row sampling: every sequence of a decode batch has its own temperature, top-k and top-p.

Shape letters (the package legend): B batch (decode slots or a prefill batch), A drafted tokens
per step, V vocabulary.

`dsv3_jax.infer.sampling` fixes one `SamplingConfig` per compiled program, which suits a batch
of prompts sent together. A server mixes requests with different settings in one decode batch and
must not recompile when a new one joins, so here the settings are arrays `RowSampling` [B] fed to
the same program. The distribution is defined exactly as `infer.sampling.filter_logits` defines
it (temperature, then top-k with ties at the k-th logit kept, then top-p over what is left), row
by row; temperature 0 is greedy: an argmax, and a one-hot "distribution" inside speculation.

Greedy rows never touch a random key and take the argmax of the same logits, so a greedy request
is exactly `infer`'s greedy decoding whatever shares its batch. The sorts that top-k and top-p
need cost O(V log V) per row; `lax.cond` skips them (and every random draw) when no row of the
batch asks for them, so an all-greedy batch pays for none of it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.infer.sampling import ACCEPT, TARGET, categorical, token_keys
from dsv3_jax.infer.speculative import accept_greedy, accept_sampled


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Sampling settings of B rows (a pytree of [B] arrays)."""

    temperature: jax.Array  # [B] float32; 0: greedy
    top_k: jax.Array  # [B] int32; 0: off
    top_p: jax.Array  # [B] float32; 1: off

    @staticmethod
    def host(rows: int) -> "RowSampling":
        """Greedy settings for `rows` rows as numpy arrays (the scheduler edits them in place)."""
        return RowSampling(np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32))

    def set_row(self, row: int, temperature: float, top_k: int, top_p: float) -> None:
        self.temperature[row], self.top_k[row], self.top_p[row] = temperature, top_k, top_p


def _per_row(x: jax.Array, like: jax.Array) -> jax.Array:
    """x [B] -> [B, 1, ..., 1] broadcasting against `like` [B, ..., V]."""
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def _truncate(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p on temperature-scaled float32 logits x [B, ..., V], k and p per row."""
    V = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)
    k = _per_row(top_k, x)
    kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, V - 1), axis=-1)
    cut_k = (k > 0) & (k < V)
    x = jnp.where(cut_k & (x < kth), -jnp.inf, x)
    desc = jnp.where(cut_k & (desc < kth), -jnp.inf, desc)  # still sorted
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
    keep = before < _per_row(top_p, x)  # the best token is always kept
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x < threshold, -jnp.inf, x)


def filter_logits(logits: jax.Array, rs: RowSampling) -> jax.Array:
    """logits [B, ..., V] -> float32 logits of each row's sampling distribution (greedy rows: scaled by 1)."""
    t = _per_row(rs.temperature, logits)
    x = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    truncating = jnp.any((rs.top_k > 0) & (rs.top_k < logits.shape[-1])) | jnp.any(rs.top_p < 1.0)
    return jax.lax.cond(truncating, _truncate, lambda x, k, p: x, x, rs.top_k, rs.top_p)


def probabilities(logits: jax.Array, rs: RowSampling) -> jax.Array:
    """[B, ..., V] -> each row's sampling distribution [B, ..., V] (one-hot argmax for greedy rows)."""
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    sampled = jax.nn.softmax(filter_logits(logits, rs), axis=-1)
    return jnp.where(_per_row(rs.temperature, logits) > 0, sampled, greedy)


def sample(logits: jax.Array, keys: jax.Array, rs: RowSampling) -> jax.Array:
    """logits [B, V], keys [B] -> tokens [B] int32: argmax for greedy rows, a draw for the others."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        return jnp.where(rs.temperature > 0, categorical(keys, probabilities(logits, rs)), best)

    return jax.lax.cond(jnp.any(rs.temperature > 0), draw, lambda _: best, None)


def verify(target_logits: jax.Array, drafts: jax.Array, q: jax.Array | None, length: jax.Array,
           seq_ids: jax.Array, key: jax.Array, rs: RowSampling) -> tuple[jax.Array, jax.Array]:
    """`infer.speculative.verify` row by row: target_logits [B,A+1,V] at positions
    length..length+A, drafts [B,A] drawn from q [B,A,V] -> accepted a [B], tokens [B,A+1].
    Greedy rows use the exact-match rule, sampled rows rejection sampling."""
    A = drafts.shape[1]
    new_pos = length[:, None] + 1 + jnp.arange(A + 1)  # the positions the tokens will occupy
    if A == 0:  # plain decoding
        return jnp.zeros_like(length), sample(target_logits[:, 0], token_keys(key, seq_ids, new_pos[:, 0], TARGET),
                                              rs)[:, None]
    a_greedy, greedy = accept_greedy(target_logits, drafts)

    def rejection(_):
        keys = token_keys(key, seq_ids, new_pos[:, :A], ACCEPT).reshape(-1)
        uniform = jax.vmap(jax.random.uniform)(keys).reshape(drafts.shape)
        a, tokens = accept_sampled(probabilities(target_logits, rs), q, drafts, uniform,
                                   token_keys(key, seq_ids, new_pos, TARGET))
        hot = rs.temperature > 0
        return jnp.where(hot, a, a_greedy), jnp.where(hot[:, None], tokens, greedy)

    return jax.lax.cond(jnp.any(rs.temperature > 0), rejection, lambda _: (a_greedy, greedy), None)
