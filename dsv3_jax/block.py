"""A decoder block, a scanned stack of them, and the same layers unstacked for decoding (`BlockList`).

Shape letters (the package legend): B batch, S tokens, D `dim`, L layers of the stack.

Pre-norm residual block as in DeepSeek's reference: x += attn(attn_norm(x)); x += ffn(ffn_norm(x)),
where ffn is a dense SwiGLU MLP for the first `n_dense_layers` layers and DeepSeekMoE after.

`BlockStack` creates L identical blocks with `nnx.vmap` (parameters get a leading layers axis,
which `sharding.py` maps onto the pipeline axis for the MoE stack) and runs them with
`jax.lax.scan`, so the compiled program holds one block whatever L is. The remat policy wraps the
scanned body. A latent cache, when given, rides in the scan carry so that each layer writes only
its S new slots.

Two-micro-batch overlap (V3 report §3.2.1-§3.2.2, ISCA '25 §2.3.1): with `overlap`, the batch is
split into two halves A (even rows) and B (odd rows) and every layer runs both, A then B. Nothing
in B's chain reads A's values and vice versa, so while A's dispatch or combine all-to-all is on the
network, B's attention and expert GEMMs are free to run; XLA's latency-hiding scheduler
(`parallel/xla_flags.py`) makes the collectives asynchronous and places independent compute between
their start and done. DeepSeek does the same by hand with SM partitioning; here the data
dependencies are the whole mechanism, and `tests/test_overlap.py` checks them in the compiled HLO.
Splitting rows as reshape [B,S] -> [B/2, 2, S] keeps both halves sharded like the batch, with no
communication.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.cache import LatentCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.context import Context
from dsv3_jax.errors import ConfigError
from dsv3_jax.layers import MLP, RMSNorm
from dsv3_jax.mla import ATTN_OUT, MLA
from dsv3_jax.moe import MOE_OUT, MoE, MoEStats
from dsv3_jax.vma import vary_like

_CP = jax.checkpoint_policies
REMAT = {  # ModelConfig.remat -> the policy of the layer's jax.checkpoint (config.REMAT_POLICIES)
    "none": None,
    "full": _CP.nothing_saveable,
    "save_dots": _CP.dots_with_no_batch_dims_saveable,
    # keep each layer's attention output and MoE output (checkpoint_name'd in mla.py / moe.py),
    # recompute everything else (norms, projections, SwiGLU, the attention core, the EP transfers)
    "save_attn_moe": _CP.save_only_these_names(ATTN_OUT, MOE_OUT),
    # the same two values kept in host memory instead (backends with a pinned_host memory space)
    "offload_attn_moe": _CP.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(ATTN_OUT, MOE_OUT),
        offload_src="device", offload_dst="pinned_host"),
}
MICRO = ("mb0", "mb1")  # named scopes of the two overlapped halves: the HLO test finds their ops by them


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.dim, "embed", **norm)
        self.attn = MLA(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, "embed", **norm)
        if moe:
            self.ffn = MoE(cfg, rngs=rngs)
        else:
            self.ffn = MLP(cfg.dim, cfg.inter_dim, std=cfg.init_std, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, rngs=rngs, impl=cfg.linear_impl,
                           fp8_weights=cfg.fp8_weights, pow2_act_scale=cfg.fp8_act_scale == "ue8m0")
        self.moe = moe

    def __call__(self, x: jax.Array, ctx: Context, cache: LatentCache | None = None, layer=0, *,
                 form: str = "expanded") -> tuple[jax.Array, MoEStats | None, LatentCache | None]:
        """x [B,S,D] -> x [B,S,D], MoE stats (None for a dense block), the cache (see MLA)."""
        a, cache = self.attn(self.attn_norm(x), ctx, cache, layer, form=form)
        x = x + a
        h = self.ffn_norm(x)
        y, stats = self.ffn(h) if self.moe else (self.ffn(h), None)
        return x + y, stats, cache


def prepend_axis(module: nnx.Module, name: str) -> None:
    """Record a new leading axis in every variable's logical_axes metadata."""
    for _, var in nnx.to_flat_state(nnx.state(module)):
        var.set_metadata("logical_axes", (name,) + tuple(var.get_metadata()["logical_axes"]))


def split_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, ...] -> even rows [B/2, ...], odd rows [B/2, ...] (no data movement under the batch sharding)."""
    pairs = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def join_pair(a: jax.Array, b: jax.Array, axis: int = 0) -> jax.Array:
    """Inverse of split_pair along `axis`."""
    stacked = jnp.stack([a, b], axis=axis + 1)
    shape = list(a.shape)
    shape[axis] *= 2
    return stacked.reshape(shape)


class BlockStack(nnx.Module):
    def __init__(self, cfg: ModelConfig, n: int, *, moe: bool, axis: str, rngs: nnx.Rngs):
        """n blocks; `axis` is the logical name of their stacked leading axis (see sharding.RULES)."""
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return Block(cfg, moe=moe, rngs=r)

        self.blocks = make(rngs)
        prepend_axis(self.blocks, axis)
        self.n = n
        self.remat = cfg.remat

    def __call__(self, x: jax.Array, ctx: Context, cache: LatentCache | None = None, *,
                 form: str = "expanded", overlap: bool = False, active: jax.Array | None = None):
        """x [B,S,D] -> x [B,S,D], per-layer MoEStats [L] (None for dense layers), the stack's cache
        [L,B,T,...] with the S new latents written in every layer.

        active [L] bool (a pipeline stage's slots, parallel/stages.py): layers where it is False are
        skipped, their stats zero."""
        if overlap and (cache is not None or x.shape[0] % 2):
            raise ConfigError(f"overlap: two micro-batches need an even batch (got {x.shape[0]}) and no cache")
        graphdef, state = nnx.split(self.blocks)

        def layer_step(h, c, layer_state, layer):
            block = nnx.merge(graphdef, layer_state)
            if not overlap:
                h, stats, c = block(h, ctx, c, layer, form=form)
                return (h, c), stats
            outs = []
            for name, half, half_ctx in zip(MICRO, h, halves):
                with jax.named_scope(name):
                    outs.append(block(half, half_ctx, form=form))
            (ha, sa, _), (hb, sb, _) = outs
            return ((ha, hb), c), (None if sa is None else sa.combine(sb))

        def body(carry, xs):
            layer_state, layer = xs
            if active is None:
                return layer_step(*carry, layer_state, layer)
            stats = jax.eval_shape(layer_step, *carry, layer_state, layer)[1]
            zeros = lambda: vary_like(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats),  # noqa: E731
                                      carry, layer_state)
            skip = lambda: (carry, zeros())  # noqa: E731
            return jax.lax.cond(active[layer], lambda: layer_step(*carry, layer_state, layer), skip)

        if REMAT[self.remat] is not None:
            body = jax.checkpoint(body, policy=REMAT[self.remat])
        if overlap:
            halves = tuple(jax.tree.map(lambda v, i=i: split_pair(v)[i], ctx) for i in (0, 1))
            x = split_pair(x)
        n = jax.tree.leaves(state)[0].shape[0]  # a pipeline stage holds its own slots of the stack
        (x, cache), stats = jax.lax.scan(body, (x, cache), (state, jnp.arange(n)))
        return (join_pair(*x) if overlap else x), stats, cache


class BlockList(nnx.Module):
    """A BlockStack's layers unstacked: one Block per layer, each with its own weight arrays, run by
    a Python loop. For decoding, where `Engine` uses it: a scanned stack slices layer i's weights out
    of the stacked [L, ...] arrays in every step, and XLA (on CPU always; on GPU wherever the slice
    cannot fold into the GEMM) materialises that slice, a copy of every weight of the model per
    step that outweighs the step's arithmetic at small batch. The loop costs compile time (the
    program holds L blocks) and nothing per step. Same call and results as the stack (the cache
    still [L,B,T,...], layer i writing its slice); no remat, overlap or pipeline slots (`active`).
    """

    def __init__(self, stack: BlockStack, cfg: ModelConfig, *, moe: bool):
        graphdef, stacked = nnx.split(stack.blocks)
        flat = dict(nnx.to_flat_state(stacked))
        blocks = []
        for i in range(stack.n):
            block = nnx.eval_shape(lambda: Block(cfg, moe=moe, rngs=nnx.Rngs(0)))
            for path, var in nnx.to_flat_state(nnx.state(block)):
                var.set_value(flat[path].get_value()[i])
            blocks.append(block)
        self.blocks = nnx.List(blocks)
        self.n = stack.n

    def __call__(self, x: jax.Array, ctx: Context, cache: LatentCache | None = None, *,
                 form: str = "expanded", overlap: bool = False, active: jax.Array | None = None):
        """As BlockStack.__call__ (stats stacked over the layers)."""
        if overlap or active is not None:
            raise ConfigError("BlockList (unstacked layers, for decoding) runs no overlap and no pipeline slots")
        stats = []
        for i, block in enumerate(self.blocks):
            x, st, cache = block(x, ctx, cache, i, form=form)
            stats.append(st)
        stacked = None if stats[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *stats)
        return x, stacked, cache
