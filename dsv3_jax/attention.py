"""The attention core behind one seam: `attention(q, k, v, mask, scale=..., impl=...)`.

Shape letters (the package legend, `dsv3_jax/__init__.py`): B batch, S queries, T keys, H heads,
Hk key/value heads (H, or 1 when one key is shared by every head), Dk query/key width, Dv value
width.

MLA uses the seam in two forms (`mla.py`): expanded, with per-head keys and values (Hk = H,
Dk = 192 and Dv = 128 at V3 size), and absorbed, where every head attends to the one cached
latent (Hk = 1, Dk = 576, Dv = 512). The core stays in high precision (V3 report §3.3: attention
is not an FP8 GEMM): scores and the softmax run in float32. `impl="reference"` is the plain jnp
path every kernel is checked against; it materializes the [B,H,S,T] scores.

The other impls (`flash_attention.py`) never hold [S,T] per head and equal the reference in value
and gradient, a row that sees no key included:

  blockwise  pure JAX, online softmax with a recomputing backward; runs everywhere (CPU CI)
  splash     TPU: jax's Pallas splash kernel (interpret mode elsewhere)
  tokamax    GPU: tokamax's Mosaic GPU kernel (the optional `gpu` extra)
  cudnn      GPU: cuDNN flash attention via jax.nn.dot_product_attention (Dk <= 256)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax import flash_attention
from dsv3_jax.errors import ConfigError

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def causal_mask(q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
    """q_pos [B,S], kv_pos [B,T] -> bool [B,S,T]: key t is visible from query s."""
    return kv_pos[:, None, :] <= q_pos[:, :, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
              impl: str = "reference") -> jax.Array:
    """q [B,S,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv], mask [B,S,T] -> [B,S,H,Dv] in q's dtype."""
    if impl not in _IMPLS:
        raise ConfigError(f"attention impl={impl!r}: expected one of {IMPLS}")
    return _IMPLS[impl](q, k, v, mask, scale=scale)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                        scale: float) -> jax.Array:
    """The plain jnp attention, scores [B,H,S,T] and all; shapes as `attention`."""
    if k.shape[2] == 1 and q.shape[2] > 1:  # one key/value head for all heads (absorbed MLA): no broadcast
        # Scores as [B,S,H,T]: the heads and queries are then one matrix per row, and on XLA:CPU
        # attention runs 1.4-2.8x faster than through [B,H,S,T] at batch 8 and at prefill sizes
        # (S 64-512), about as fast at batch 1 (docs/BENCHMARKS.md, Decode).
        scores = jnp.einsum("bshk,btk->bsht", q, k[:, :, 0], preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(mask[:, :, None, :], scores, NEG_INF), axis=-1)
        return jnp.einsum("bsht,btd->bshd", probs, v[:, :, 0].astype(jnp.float32)).astype(q.dtype)
    scores = jnp.einsum("bshk,bthk->bhst", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhst,bthd->bshd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


_IMPLS = {
    "reference": reference_attention,
    "blockwise": flash_attention.blockwise_attention,
    "splash": flash_attention.splash_attention,
    "tokamax": flash_attention.tokamax_attention,
    "cudnn": flash_attention.cudnn_attention,
}
IMPLS = tuple(_IMPLS)  # the names ModelConfig.attn_impl accepts
