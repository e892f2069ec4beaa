"""Token sampling: greedy, temperature, top-k, top-p, set per row; seeded per (sequence, position).

Shape letters (the package legend): B batch, V vocabulary.

`SamplingConfig` is the validated setting a user asks for (the CLI, `Engine.generate`, one server
request). The compiled programs take `RowSampling` instead: one setting per row as arrays [B],
so the settings are data rather than compile-time constants, one program serves every mix of
them, and a server's request with its own temperature joins a running batch without a
recompilation. `SamplingConfig.rows(B)` gives every row of a batch the same setting.

`filter_logits` is the one place the sampling distribution is defined: logits / temperature,
everything below the k-th best logit set to -inf (ties with it kept), then everything outside the
smallest set whose probability reaches top_p. Plain sampling draws from it, and speculative
sampling builds both its target p and its draft q with it (`speculative.py`), which is what
keeps the speculative output distribution equal to the plain one.

Temperature 0 is greedy: the argmax of the same logits, never a random key, so a greedy row is
exactly greedy decoding whatever shares its batch; inside speculation its "distribution" is the
one-hot argmax. The sorts top-k and top-p need cost O(V log V) per row; `lax.cond` skips them,
and every softmax and random draw, when no row of the batch asks for them, so an all-greedy batch
pays for none of it.

Every random draw uses the key fold_in(fold_in(fold_in(seed_key, sequence), position), purpose),
so a sequence's samples do not depend on what else shares its batch, and the same seed
reproduces the same text.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.errors import ConfigError

# Purposes of a random draw (the last fold_in): one independent stream each.
TARGET, DRAFT, ACCEPT = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Sampling settings of B rows (a pytree of [B] arrays)."""

    temperature: jax.Array  # [B] float32; 0: greedy
    top_k: jax.Array  # [B] int32; 0: off
    top_p: jax.Array  # [B] float32; 1: off

    def set_row(self, row: int, s: SamplingConfig) -> None:
        """Give row `row` the setting s (numpy rows, as the server keeps them on the host)."""
        self.temperature[row], self.top_k[row], self.top_p[row] = s.temperature, s.top_k, s.top_p


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan and inf compare False
            raise ConfigError(f"SamplingConfig.temperature={self.temperature}: expected a finite value >= 0 "
                              "(0 is greedy)")
        if self.top_k < 0:
            raise ConfigError(f"SamplingConfig.top_k={self.top_k}: expected >= 0 (0 is off)")
        if not 0.0 < self.top_p <= 1.0:  # (nan fails this too)
            raise ConfigError(f"SamplingConfig.top_p={self.top_p}: expected in (0, 1] (1 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def rows(self, batch: int) -> RowSampling:
        """This setting for each of `batch` rows, as numpy arrays (a server edits them in place)."""
        return RowSampling(np.full(batch, self.temperature, np.float32), np.full(batch, self.top_k, np.int32),
                           np.full(batch, self.top_p, np.float32))


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
    p = _per_row(top_p, x)
    # The best token is always kept; p = 1 keeps all (rounding can push a float cumsum to 1 early).
    keep = (before < p) | (p >= 1.0)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x < threshold, -jnp.inf, x)


def filter_logits(logits: jax.Array, rs: RowSampling) -> jax.Array:
    """logits [B, ..., V] -> float32 logits of each row's sampling distribution (excluded tokens at
    -inf; greedy rows scaled by 1)."""
    t = _per_row(rs.temperature, logits)
    x = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    truncating = jnp.any((rs.top_k > 0) & (rs.top_k < logits.shape[-1])) | jnp.any(rs.top_p < 1.0)
    return jax.lax.cond(truncating, _truncate, lambda x, k, p: x, x, rs.top_k, rs.top_p)


def probabilities(logits: jax.Array, rs: RowSampling) -> jax.Array:
    """[B, ..., V] -> each row's sampling distribution [B, ..., V] (one-hot argmax for greedy rows)."""
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)

    def mixed(_):
        sampled = jax.nn.softmax(filter_logits(logits, rs), axis=-1)
        return jnp.where(_per_row(rs.temperature, logits) > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(rs.temperature > 0), mixed, lambda _: greedy, None)


def token_keys(key: jax.Array, seq_ids: jax.Array, positions: jax.Array, purpose: int) -> jax.Array:
    """One key per (sequence, position): seq_ids [B], positions [B, ...] -> keys [B, ...]."""
    def one(seq, pos):
        k = jax.random.fold_in(key, seq)
        keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(k, p), purpose))(pos.reshape(-1))
        return keys.reshape(pos.shape)

    return jax.vmap(one)(seq_ids, positions)


def categorical(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """One draw per key from probs [..., V] (rows summing to 1) -> int32 [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    draws = jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)))(keys.reshape(-1), flat)
    return draws.reshape(probs.shape[:-1]).astype(jnp.int32)


def sample(logits: jax.Array, keys: jax.Array, rs: RowSampling) -> jax.Array:
    """logits [B, V], keys [B] -> tokens [B] int32: argmax for greedy rows, a draw for the others."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        return jnp.where(rs.temperature > 0, categorical(keys, probabilities(logits, rs)), best)

    return jax.lax.cond(jnp.any(rs.temperature > 0), draw, lambda _: best, None)
