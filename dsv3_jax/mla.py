"""Multi-head Latent Attention (V3 report §2.1.1, eqs. 1-11).

Shape letters: B batch, S query length, T key length, D `dim`, H heads, C `kv_lora_rank`,
Q `q_lora_rank`, N `qk_nope_head_dim`, R `qk_rope_head_dim`, Dv `v_head_dim`.

Keys and values are compressed into one latent c_kv [B,T,C] (plus a single roped key k_pe [B,T,R]
shared by all heads); `wkv_b` expands the latent into per-head k_nope and v. Queries are
compressed through a Q-rank bottleneck (`wq_a` -> `q_norm` -> `wq_b`) unless q_lora_rank == 0
(V2-Lite), which uses one `wq`. Only the decoupled R-dim part carries position (RoPE).

The training path here expands K/V. Decoding never does: it caches (c_kv, k_pe) and folds the
K half of `wkv_b` into the query (see `infer/`), which is why `queries` and `latent` are separate
methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.attention import attention
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Linear, RMSNorm
from dsv3_jax.rope import apply_rope


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                  impl=cfg.linear_impl, fp8_weights=cfg.fp8_weights)
        H = cfg.n_heads
        if cfg.q_lora_rank:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ("q_lora", "embed"), **kw)
            self.q_norm = RMSNorm(cfg.q_lora_rank, "q_lora", eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
            self.wq_b = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, ("heads", "q_lora"), **kw)
        else:
            self.wq = Linear(cfg.dim, H * cfg.qk_head_dim, ("heads", "embed"), **kw)
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("kv_lora", "embed"), **kw)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, "kv_lora", eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.wkv_b = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                            ("heads", "kv_lora"), **kw)
        self.wo = Linear(H * cfg.v_head_dim, cfg.dim, ("embed", "heads"), **kw)
        self.cfg = cfg

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,S,D] -> q_nope [B,S,H,N], q_pe [B,S,H,R] (roped)."""
        cfg = self.cfg
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank else self.wq(x)
        q = q.reshape(*x.shape[:2], cfg.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,T,D] -> c_kv [B,T,C] (normalised), k_pe [B,T,R] (roped): all that decoding caches."""
        c_kv, k_pe = jnp.split(self.wkv_a(x), [self.cfg.kv_lora_rank], axis=-1)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin)[:, :, 0, :]
        return self.kv_norm(c_kv), k_pe

    def expand(self, c_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """c_kv [B,T,C] -> k_nope [B,T,H,N], v [B,T,H,Dv] through wkv_b."""
        cfg = self.cfg
        kv = self.wkv_b(c_kv).reshape(*c_kv.shape[:2], cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        return jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """Training/prefill path: x [B,S,D], cos/sin [B,S,R/2], mask [B,S,S] -> [B,S,D]."""
        cfg = self.cfg
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        k_nope, v = self.expand(c_kv)
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (*k_pe.shape[:2], cfg.n_heads, cfg.qk_rope_head_dim))
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        k = jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1)
        out = attention(q, k, v, mask, scale=cfg.softmax_scale, impl=cfg.attn_impl)
        return self.wo(out.reshape(*x.shape[:2], cfg.n_heads * cfg.v_head_dim))
