"""The attention core behind one seam: `attention(q, k, v, ..., impl=...)`.

Shape letters: B batch, S query length, T key length, H heads, K qk head dim, Dv v head dim.

The core stays in high precision (V3 report §3.3: attention is not an FP8 GEMM): scores and the
softmax run in float32. `impl="reference"` is the plain jnp path that every kernel is checked
against; kernels plug in here later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def causal_mask(q_pos: jax.Array, kv_pos: jax.Array, kv_valid: jax.Array | None = None) -> jax.Array:
    """q_pos [B, S], kv_pos [B, T] -> bool [B, S, T]: key t is visible from query s."""
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, :]
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
              impl: str = "reference") -> jax.Array:
    """q [B,S,H,K], k [B,T,H,K], v [B,T,H,Dv], mask [B,S,T] -> [B,S,H,Dv] in q's dtype."""
    if impl != "reference":
        raise ValueError(f"attention impl={impl!r}: expected 'reference'")
    scores = jnp.einsum("bshk,bthk->bhst", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhst,bthd->bshd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)
