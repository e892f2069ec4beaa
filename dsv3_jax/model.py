"""The DeepSeek-V3 language model: embedding, dense then MoE blocks (scanned), final norm, head, MTP.

Shape letters (the package legend): B batch, S tokens, D `dim`, V vocabulary, L layers,
E routed experts, Dm MTP depth (modules), Tb token-buffer length.

This file holds the one forward pass. `forward` is the training composition
(context -> trunk -> heads); its pieces are public so that every other caller composes the same
code instead of copying it: a pipeline stage runs `trunk` on its range of stacks and the last
stage `heads`; inference runs `trunk` with a latent cache (expanded attention for prefill,
absorbed for decoding) and `mtp_chain` to draft.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.block import BlockList, BlockStack
from dsv3_jax.cache import Cache, LatentCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.context import Context, make_context, sequence_positions
from dsv3_jax.errors import ConfigError
from dsv3_jax.layers import Embedding, RMSNorm, matmul_nt, normal_param
from dsv3_jax.moe import MoEStats
from dsv3_jax.mtp import MTPModule, tokens_ahead

STACKS = ("dense_layers", "moe_layers")  # in order; each may be absent (n_dense_layers = 0, ...)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array  # [B,S,V] float32, position i predicts token i+1
    mtp_logits: jax.Array | None  # [Dm,B,S,V] float32, depth k at position i predicts token i+k+1
    moe: MoEStats | None  # per MoE layer [L_moe + Dm, ...], MTP modules last
    # forward(logits=False): the normalised hidden states the head would read, for a loss that takes
    # the logits a chunk of tokens at a time (train/loss.chunked_cross_entropy); logits are then None
    hidden: jax.Array | None = None  # [B,S,D]
    mtp_hidden: jax.Array | None = None  # [Dm,B,S,D]


def check_tokens(tokens, vocab_size: int) -> None:
    """Clear errors for bad token ids at the public API (skipped for traced values inside jit)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"tokens: expected integer ids of shape [batch, seq], got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ConfigError(f"tokens: ids must lie in [0, {vocab_size}) (the model's vocab_size); "
                          f"got min {arr.min()}, max {arr.max()}")


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.dim, std=cfg.init_std, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs)
        # The dense stack's layers axis is not the pipeline's: only the MoE layers are split over
        # stages (the dense ones run on the first stage with the embedding).
        self.dense_layers = (BlockStack(cfg, cfg.n_dense_layers, moe=False, axis="dense_layers", rngs=rngs)
                             if cfg.n_dense_layers else None)
        self.moe_layers = (BlockStack(cfg, cfg.n_moe_layers, moe=True, axis="layers", rngs=rngs)
                           if cfg.n_moe_layers else None)
        self.norm = RMSNorm(cfg.dim, "embed", eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.head = normal_param(rngs, (cfg.vocab_size, cfg.dim), cfg.init_std, cfg.param_dtype,
                                 ("vocab", "embed"))
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.n_mtp_modules)])

    def unstacked(self) -> "Transformer":
        """The same model (the same embedding, head and MTP arrays) with each stack's layers as
        separate arrays run by a Python loop (`block.BlockList`): the decoding form, free of the
        per-step weight slicing a scanned stack costs. The stacked arrays stay with `self`."""
        graphdef, state = nnx.split(self)
        model = nnx.merge(graphdef, state)
        for name in STACKS:
            stack = getattr(model, name)
            if isinstance(stack, BlockStack):
                setattr(model, name, BlockList(stack, self.cfg, moe=name == "moe_layers"))
        return model

    # ---- the pieces -------------------------------------------------------------------------------
    def context(self, positions: jax.Array, kv_len: int | None = None, *,
                join: tuple[jax.Array, int] | None = None) -> Context:
        """positions [B,S] -> the call's rope tables and mask (over kv_len cache slots, if given)."""
        return make_context(self.cfg, positions, kv_len, join=join)

    def stacks(self) -> list[BlockStack]:
        return [s for s in (getattr(self, name) for name in STACKS) if s is not None]

    def trunk(self, h: jax.Array, ctx: Context, caches: tuple[LatentCache, ...] | None = None, *,
              form: str = "expanded", overlap: bool = False, only: str | None = None,
              active: jax.Array | None = None):
        """h [B,S,D] (embedded tokens) through the dense then MoE stacks -> h [B,S,D] before the final
        norm, MoEStats [L_moe] (None without MoE layers), caches (one per stack, as `Cache.layers`).

        `only` runs one stack ("dense_layers" or "moe_layers"): a pipeline stage's range; `active`
        [L_moe] bool skips the MoE stack's spare slots (parallel/stages.py).
        """
        stacks = self.stacks()
        caches = (None,) * len(stacks) if caches is None else caches
        new, stats = [], None
        for stack, cache in zip(stacks, caches, strict=True):
            if only is None or stack is getattr(self, only):
                moe = stack is self.moe_layers
                h, st, cache = stack(h, ctx, cache, form=form, overlap=overlap, active=active if moe else None)
                stats = st if moe else stats
            new.append(cache)
        return h, stats, tuple(new)

    def logits(self, h: jax.Array, norm: RMSNorm | None = None) -> jax.Array:
        """Final norm (the main model's, or an MTP module's) + the shared head in float32:
        h [B,S,D] -> logits [B,S,V]."""
        norm = self.norm if norm is None else norm
        return matmul_nt(norm(h), self.head[...].astype(h.dtype), out_dtype=jnp.float32)

    def mtp_chain(self, h: jax.Array, tokens: jax.Array, ctx: Context, caches: tuple[LatentCache, ...] | None = None,
                  *, depth: int | None = None, form: str = "expanded",
                  after_depth: Callable[[int, jax.Array, jax.Array], jax.Array] | None = None):
        """The MTP modules 1..depth in sequence (mtp.py), sharing the embedding.

        h [B,S,D]: the main model's *normalised* hidden state at ctx.positions; tokens [B,Tb]: every
        known token by position (module k at position i reads the token at i + k).
        after_depth(k, h_k, tokens) -> tokens runs after module k and may write tokens (speculative
        decoding stores its draft there for module k+1 to read).
        -> hidden states [h_1 .. h_depth] (before each module's norm), MoEStats [depth] or None,
        caches (one per module when given).
        """
        depth = len(self.mtp) if depth is None else depth
        hs, stats, new = [], [], []
        for k in range(1, depth + 1):
            emb = self.embed(tokens_ahead(tokens, ctx.positions, k))
            cache = None if caches is None else caches[k - 1]
            h, st, cache = self.mtp[k - 1](h, emb, ctx, cache, form=form)
            if after_depth is not None:
                tokens = after_depth(k, h, tokens)
            hs.append(h)
            stats.append(None if st is None else jax.tree.map(lambda a: a[None], st))
            new.append(cache)
        return hs, MoEStats.concat(stats), (None if caches is None else tuple(new))

    def heads(self, h: jax.Array, tokens: jax.Array, ctx: Context, stats: MoEStats | None = None, *,
              with_mtp: bool = True, logits: bool = True) -> ModelOutput:
        """Final norm + head, and the MTP chain on the shared embedding and head (the last pipeline
        stage's part). h [B,S,D] from `trunk`, tokens [B,S] the inputs, stats the trunk's.
        logits=False: the normalised hidden states instead of the logits (ModelOutput.hidden)."""
        mtp_hs = None
        if with_mtp and len(self.mtp):
            # depth 1 reads the main model's normalised output (as HF and vLLM do)
            hs, mtp_stats, _ = self.mtp_chain(self.norm(h), tokens, ctx)
            mtp_hs = [(hk, m.norm) for hk, m in zip(hs, self.mtp)]
            stats = MoEStats.concat([stats, mtp_stats])
        if not logits:
            return ModelOutput(None, None, stats, hidden=self.norm(h),
                               mtp_hidden=None if mtp_hs is None else jnp.stack([n(hk) for hk, n in mtp_hs]))
        mtp_logits = None if mtp_hs is None else jnp.stack([self.logits(hk, n) for hk, n in mtp_hs])
        return ModelOutput(logits=self.logits(h), mtp_logits=mtp_logits, moe=stats)

    # ---- the compositions ---------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B,S] int -> float32 logits [B,S,V] of the main head."""
        return self.forward(tokens, with_mtp=False).logits

    def forward(self, tokens: jax.Array, *, with_mtp: bool = True, overlap: bool = False,
                logits: bool = True) -> ModelOutput:
        """Training forward: tokens [B,S] int -> ModelOutput (main logits, MTP logits, MoE statistics).
        `overlap` runs the stacks as two interleaved micro-batches (block.py); same outputs.
        logits=False: normalised hidden states instead of logits (`heads`)."""
        check_tokens(tokens, self.cfg.vocab_size)
        ctx = self.context(sequence_positions(*tokens.shape))
        h, stats, _ = self.trunk(self.embed(tokens), ctx, overlap=overlap)
        return self.heads(h, tokens, ctx, stats, with_mtp=with_mtp, logits=logits)

    def forward_cached(self, tokens: jax.Array, positions: jax.Array, cache: Cache, *, form: str,
                       kv_len: int | None = None, join: tuple[jax.Array, int] | None = None):
        """Inference forward over S new tokens at `positions` [B,S], attending over the cache's
        first kv_len slots (default all T; every position must lie below it) -> hidden state
        [B,S,D] before the final norm, the cache with their latents written.

        Prefill is the call with positions 0..S-1 of an S-slot cache and form="expanded"; a decode
        step or a speculative verification the call at length + (0..S-1) with form="absorbed".
        join (slot, J): the last J of the B rows are a prompt chunk of cache row `slot` (a mixed
        step, `Context.join_slot`); the cache has B - J rows.
        """
        ctx = self.context(positions, kv_len=kv_len or cache.slots, join=join)
        h, _, layers = self.trunk(self.embed(tokens), ctx, cache.layers, form=form)
        return h, dataclasses.replace(cache, layers=layers)
