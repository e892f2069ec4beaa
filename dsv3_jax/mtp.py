"""Multi-Token Prediction modules (V3 report §2.2, eq. 21-25).

Shape letters (the package legend): B batch, S positions, D `dim`, Tb token-buffer length.

Module k (k = 1..D_mtp) predicts token t_{i+k+1} at position i from two inputs: the previous
depth's hidden state h^{k-1}_i (h^0 is the main model's output after its final norm; deeper modules
get the previous block's output) and the embedding of token t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      # [D] <- [2D]
    h^k_i = Block_k(h'_i),   logits = Head(norm_k(h^k_i))

The embedding and the output head are the main model's own (shared, as in the paper); each
module has its own final norm (`shared_head.norm` in the checkpoint). The concatenation puts the
embedding first: that is the order of the released `eh_proj` weights (vLLM and HF's MTP loader
agree), even though eq. 21 writes the hidden state first. The chain over the depths is
`Transformer.mtp_chain`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.block import REMAT, Block
from dsv3_jax.cache import LatentCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.context import Context
from dsv3_jax.layers import Linear, RMSNorm


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.enorm = RMSNorm(cfg.dim, "embed", **norm)
        self.hnorm = RMSNorm(cfg.dim, "embed", **norm)
        # Stored in BF16 even in DeepSeek's FP8 checkpoints (no weight_scale_inv): never FP8-stored.
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, ("embed", "embed_cat"), std=cfg.init_std,
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, impl=cfg.linear_impl)
        self.block = Block(cfg, moe=cfg.n_routed_experts > 0, rngs=rngs)
        self.norm = RMSNorm(cfg.dim, "embed", **norm)
        self.remat = cfg.remat

    def __call__(self, h_prev: jax.Array, emb_next: jax.Array, ctx: Context, cache: LatentCache | None = None,
                 *, form: str = "expanded"):
        """h_prev, emb_next [B,S,D] -> h [B,S,D] (before `norm`), the block's MoE stats, its cache
        (one layer: L = 1)."""
        x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1))
        if cache is not None or REMAT[self.remat] is None:
            return self.block(x, ctx, cache, 0, form=form)
        # Training: the block is rematerialised under the same policy as the scanned layers (else
        # its whole activation set, the EP buffers of its MoE layer included, waits for the
        # backward on the last pipeline stage, where the head's gradients already peak).
        graphdef, state = nnx.split(self.block)

        def run(state, x):
            return nnx.merge(graphdef, state)(x, ctx, None, 0, form=form)

        return jax.checkpoint(run, policy=REMAT[self.remat])(state, x)


def tokens_ahead(tokens: jax.Array, positions: jax.Array, k: int) -> jax.Array:
    """tokens [B,Tb] (token p at column p), positions [B,S] -> the token at position + k [B,S].

    Positions past the buffer get 0 (the training loss masks them); negative ones (a speculative
    window reaching before the prompt) read column 0, whose result is never used.
    """
    ahead = positions + k
    got = jnp.take_along_axis(tokens, jnp.clip(ahead, 0, tokens.shape[1] - 1), axis=1)
    return jnp.where(ahead < tokens.shape[1], got, 0)


def shift_tokens(tokens: jax.Array, k: int, fill: int = 0) -> jax.Array:
    """tokens [B,S] -> tokens[:, i+k] at position i; the last k positions get `fill` (masked in the loss)."""
    pad = jnp.full((tokens.shape[0], k), fill, tokens.dtype)
    return jnp.concatenate([tokens[:, k:], pad], axis=1)
