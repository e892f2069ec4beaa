"""The preallocated latent KV cache of MLA (V3 report §2.1.1; ISCA '25 paper §2.1.2).

Shape letters (the package legend): L layers of one stack, B batch, S new tokens, T cache slots,
C `kv_lora_rank`, R `qk_rope_head_dim`.

Per layer the cache holds only what `MLA.latent` returns: the normalised latent c_kv [B,T,C] and
the roped shared key k_pe [B,T,R]. Nothing per head is stored, so a token costs
(C + R) x layers x bytes: 576 x 61 x 2 = 70,272 bytes for V3 in BF16, against ~4 MB for the
expanded per-head K/V.

Slots are positions: the token at position p of a sequence lives in slot p. Batches are
right-padded, so a sequence's slots 0..length-1 are its own tokens and everything past them is
either a pad or a stale entry; a query at position p may only see slots <= p, and the slot at p
is always written before (or by) the step whose query sits at p. That one causal rule therefore
hides pads and stale entries without a separate validity mask, and RoPE positions of a padded
batch equal those of each sequence run alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.sharding import RULES, logical_to_spec
from dsv3_jax.errors import ConfigError

# Logical axes of a stacked cache leaf [L, B, T, C or R] (names from sharding.RULES).
CACHE_AXES = ("layers", "batch", "seq", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    """One scanned stack's cache (or one MTP module's, with L = 1)."""

    c_kv: jax.Array  # [L, B, T, C] kv_norm(c_kv)
    k_pe: jax.Array  # [L, B, T, R] roped

    def write(self, layer, positions: jax.Array, c_new: jax.Array, pe_new: jax.Array,
              rows: jax.Array | None = None) -> "LatentCache":
        """Store c_new [B,S,C], pe_new [B,S,R] at slots `positions` [B,S] of `layer`, batch row b in
        cache row rows[b] (default b; `Context.cache_rows`).

        Slots outside [0, T) (negative positions of a draft window, or past the end) are dropped.
        """
        T = self.c_kv.shape[2]
        slots = jnp.where(positions < 0, T, positions)
        rows = (jnp.arange(positions.shape[0]) if rows is None else rows)[:, None]
        c_kv = self.c_kv.at[layer, rows, slots].set(c_new.astype(self.c_kv.dtype), mode="drop")
        k_pe = self.k_pe.at[layer, rows, slots].set(pe_new.astype(self.k_pe.dtype), mode="drop")
        return LatentCache(c_kv, k_pe)

    def read(self, layer, kv_len: int, dtype) -> tuple[jax.Array, jax.Array]:
        """The first kv_len slots of `layer`: c_kv [B,T,C], k_pe [B,T,R] in `dtype`."""
        return self.c_kv[layer, :, :kv_len].astype(dtype), self.k_pe[layer, :, :kv_len].astype(dtype)

    def read_row(self, layer, row: jax.Array, kv_len: int, dtype) -> tuple[jax.Array, jax.Array]:
        """The first kv_len slots of cache row `row` ([] int32) of `layer`: c_kv [1,T,C], k_pe [1,T,R]."""
        def one(x):
            return jax.lax.dynamic_slice_in_dim(x[layer], row, 1, axis=0)[:, :kv_len].astype(dtype)
        return one(self.c_kv), one(self.k_pe)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """The main model's caches (one per BlockStack: dense, then MoE) and one per MTP module used."""

    layers: tuple[LatentCache, ...]
    mtp: tuple[LatentCache, ...]

    @property
    def slots(self) -> int:
        """T: cache slots per sequence."""
        return self.layers[0].c_kv.shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, n_mtp: int = 0) -> Cache:
    """Zeros for `batch` sequences of up to `max_len` slots; `n_mtp` MTP modules get their own."""
    if n_mtp > cfg.n_mtp_modules:
        raise ConfigError(f"n_mtp={n_mtp}: the model has only n_mtp_modules={cfg.n_mtp_modules}")

    def stack(n):
        return LatentCache(jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                           jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype))

    layers = tuple(stack(n) for n in (cfg.n_dense_layers, cfg.n_moe_layers) if n)
    return Cache(layers=layers, mtp=tuple(stack(1) for _ in range(n_mtp)))


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def bytes_per_token(cache: Cache, *, include_mtp: bool = False) -> int:
    """Cache bytes one token occupies (works on `jax.eval_shape` outputs too)."""
    leaves = jax.tree.leaves(cache if include_mtp else cache.layers)
    B, T = cache.layers[0].c_kv.shape[1:3]
    return sum(_nbytes(x) for x in leaves) // (B * T)


def formula_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """(kv_lora_rank + qk_rope_head_dim) x n_layers x itemsize (MTP layers not counted)."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * jnp.dtype(dtype).itemsize


def cache_shardings(cache: Cache, mesh: Mesh):
    """NamedShardings for every cache leaf: layers over `pipeline`, batch over the data axes."""
    rules = RULES + ((None, None),)
    return jax.tree.map(lambda x: NamedSharding(mesh, logical_to_spec(CACHE_AXES, x.shape, mesh, rules)), cache)
