"""The DeepSeek-V3 language model: embedding, dense then MoE blocks (scanned), final norm, head, MTP.

Shape letters: B batch, S sequence, D `dim`, V vocabulary, L layers, E routed experts, D_mtp depth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.attention import causal_mask
from dsv3_jax.block import BlockStack
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Embedding, RMSNorm, normal_param
from dsv3_jax.mtp import MTPModule, shift_tokens
from dsv3_jax.rope import rope_tables


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array  # [B,S,V] float32, position i predicts token i+1
    mtp_logits: jax.Array | None  # [D_mtp,B,S,V] float32, depth k at position i predicts token i+k+1
    moe_load: jax.Array | None  # [L_moe + D_mtp, E] tokens per expert per MoE layer (MTP last)
    moe_balance: jax.Array | None  # [L_moe + D_mtp] sequence-wise balance loss, before alpha


def check_tokens(tokens, vocab_size: int) -> None:
    """Clear errors for bad token ids at the public API (skipped for traced values inside jit)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens: expected integer ids of shape [batch, seq], got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"tokens: ids must lie in [0, {vocab_size}) (the model's vocab_size); "
                         f"got min {arr.min()}, max {arr.max()}")


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.dim, std=cfg.init_std, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs)
        self.dense_layers = (BlockStack(cfg, cfg.n_dense_layers, moe=False, rngs=rngs)
                             if cfg.n_dense_layers else None)
        self.moe_layers = BlockStack(cfg, cfg.n_moe_layers, moe=True, rngs=rngs) if cfg.n_moe_layers else None
        self.norm = RMSNorm(cfg.dim, "embed", eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.head = normal_param(rngs, (cfg.vocab_size, cfg.dim), cfg.init_std, cfg.param_dtype,
                                 ("vocab", "embed"))
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.n_mtp_modules)])

    def project(self, h: jax.Array, norm: RMSNorm) -> jax.Array:
        """Final norm + output head in float32: h [B,S,D] -> logits [B,S,V]."""
        return jnp.einsum("bsd,vd->bsv", norm(h), self.head[...].astype(h.dtype),
                          preferred_element_type=jnp.float32)

    def trunk(self, tokens: jax.Array, positions: jax.Array):
        """tokens, positions [B,S] -> last hidden state [B,S,D] before the final norm, MoE stats, rope, mask."""
        cos, sin = rope_tables(self.cfg, positions)
        mask = causal_mask(positions, positions)
        h = self.embed(tokens)
        if self.dense_layers is not None:
            h, _ = self.dense_layers(h, cos, sin, mask)
        stats = {}
        if self.moe_layers is not None:
            h, stats = self.moe_layers(h, cos, sin, mask)
        return h, stats, (cos, sin, mask)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B,S] int -> float32 logits [B,S,V] of the main head."""
        return self.forward(tokens, with_mtp=False).logits

    def forward(self, tokens: jax.Array, *, with_mtp: bool = True) -> ModelOutput:
        """tokens [B,S] int -> ModelOutput (main logits, MTP logits, per-layer MoE statistics)."""
        check_tokens(tokens, self.cfg.vocab_size)
        B, S = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        h, stats, (cos, sin, mask) = self.trunk(tokens, positions)
        logits = self.project(h, self.norm)
        loads, balances = [stats["load"]] if stats else [], [stats["balance"]] if stats else []
        mtp_logits = None
        if with_mtp and len(self.mtp):
            outs = []
            h = self.norm(h)  # depth 1 reads the main model's normalised output (as HF and vLLM do)
            for k, module in enumerate(self.mtp, start=1):
                h, st = module(h, self.embed(shift_tokens(tokens, k)), cos, sin, mask)
                outs.append(self.project(h, module.norm))
                if st:
                    loads.append(st["load"][None])
                    balances.append(st["balance"][None])
            mtp_logits = jnp.stack(outs)
        return ModelOutput(
            logits=logits,
            mtp_logits=mtp_logits,
            moe_load=jnp.concatenate(loads) if loads else None,
            moe_balance=jnp.concatenate(balances) if balances else None,
        )
