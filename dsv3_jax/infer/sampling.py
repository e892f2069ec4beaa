"""Token sampling: greedy, temperature, top-k, top-p; seeded per (sequence, position).

Shape letters (the package legend): B batch, V vocabulary.

`filter_logits` is the one place the sampling distribution is defined: logits / temperature,
everything outside the k best set to -inf, then everything outside the smallest set whose
probability reaches top_p. Plain sampling draws from it, and speculative sampling builds both its
target p and its draft q with it, which is what keeps the speculative output distribution equal
to the plain one.

Every random draw uses the key fold_in(fold_in(fold_in(seed_key, sequence), position), purpose),
so a sequence's samples do not depend on what else shares its batch, and the same seed
reproduces the same text.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dsv3_jax.errors import ConfigError

# Purposes of a random draw (the last fold_in): one independent stream each.
TARGET, DRAFT, ACCEPT = 0, 1, 2


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


def filter_logits(logits: jax.Array, s: SamplingConfig) -> jax.Array:
    """logits [..., V] -> float32 logits of the sampling distribution (excluded tokens at -inf)."""
    logits = logits.astype(jnp.float32) / (s.temperature if s.temperature > 0 else 1.0)
    V = logits.shape[-1]
    if 0 < s.top_k < V:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
        keep = before < s.top_p  # the best token is always kept
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def probabilities(logits: jax.Array, s: SamplingConfig) -> jax.Array:
    """[..., V] -> the sampling distribution [..., V] (one-hot argmax when greedy)."""
    if s.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, s), axis=-1)


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


def sample(logits: jax.Array, keys: jax.Array, s: SamplingConfig) -> jax.Array:
    """logits [B, V], keys [B] -> tokens [B] int32."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return categorical(keys, probabilities(logits, s))
