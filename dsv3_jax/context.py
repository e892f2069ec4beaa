"""What every layer of one forward call shares: positions, their rope tables, the attention mask.

Built once per call by `Transformer.context` and passed down unchanged; the training forward,
prefill, a decode step and a speculative verification differ only in the positions and in how
many key slots the mask covers (see `cache.py`: slots are positions, so key t sits at position t).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax.attention import causal_mask
from dsv3_jax.config import ModelConfig
from dsv3_jax.rope import rope_tables


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Context:
    positions: jax.Array  # [B,S] int32: the position of each query token
    cos: jax.Array  # [B,S,R/2] float32 rope table at `positions`
    sin: jax.Array  # [B,S,R/2]
    mask: jax.Array  # [B,S,T] bool: key t is visible from query s
    # A mixed step (Sarathi's chunked prefill inside a decode step): the last `join_rows` batch rows
    # are not rows of the cache but one prompt chunk of cache row `join_slot`, a token per row
    # (`cache_rows`; MLA attends them as that one row's chunk). 0: every batch row is its cache row.
    join_slot: jax.Array | None = None  # [] int32
    join_rows: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]

    def cache_rows(self) -> jax.Array | None:
        """[B] the cache row each batch row writes (None: row b is cache row b)."""
        if not self.join_rows:
            return None
        B = self.positions.shape[0] - self.join_rows
        return jnp.concatenate([jnp.arange(B, dtype=jnp.int32), jnp.full((self.join_rows,), self.join_slot, jnp.int32)])


def make_context(cfg: ModelConfig, positions: jax.Array, kv_len: int | None = None, *,
                 join: tuple[jax.Array, int] | None = None) -> Context:
    """positions [B,S] -> Context. Without `kv_len` the keys are the S tokens themselves (training,
    or a prefill that attends only to its own prompt); with it, the first kv_len cache slots.
    join: (slot, rows) of a mixed step (`Context.join_slot`)."""
    cos, sin = rope_tables(cfg, positions)
    if kv_len is None:
        kv_positions = positions
    else:
        kv_positions = jnp.broadcast_to(jnp.arange(kv_len, dtype=positions.dtype), (positions.shape[0], kv_len))
    slot, rows = (None, 0) if join is None else join
    return Context(positions, cos, sin, causal_mask(positions, kv_positions), slot, rows)


def sequence_positions(batch: int, seq_len: int) -> jax.Array:
    """[B,S] positions 0..S-1 of whole sequences."""
    return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
