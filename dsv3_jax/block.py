"""A decoder block and a scanned stack of them.

Pre-norm residual block as in DeepSeek's reference: x += attn(attn_norm(x)); x += ffn(ffn_norm(x)),
where ffn is a dense SwiGLU MLP for the first `n_dense_layers` layers and DeepSeekMoE after.

`BlockStack` creates L identical blocks with `nnx.vmap` (parameters get a leading `layers` axis,
which `sharding.py` maps onto the pipeline axis) and runs them with `jax.lax.scan`, so the
compiled program holds one block whatever L is. The remat policy wraps the scanned body.
"""

from __future__ import annotations

import jax
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, RMSNorm
from dsv3_jax.mla import MLA
from dsv3_jax.moe import MoE

REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
                           fp8_weights=cfg.fp8_weights)
        self.moe = moe

    def __call__(self, x, cos, sin, mask) -> tuple[jax.Array, dict]:
        """x [B,S,D] -> x [B,S,D], MoE stats ({} for a dense block)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        h = self.ffn_norm(x)
        if self.moe:
            y, stats = self.ffn(h)
        else:
            y, stats = self.ffn(h), {}
        return x + y, stats


def prepend_axis(module: nnx.Module, name: str) -> None:
    """Record a new leading axis in every variable's logical_axes metadata."""
    for _, var in nnx.to_flat_state(nnx.state(module)):
        var.set_metadata("logical_axes", (name,) + tuple(var.get_metadata()["logical_axes"]))


class BlockStack(nnx.Module):
    def __init__(self, cfg: ModelConfig, n: int, *, moe: bool, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return Block(cfg, moe=moe, rngs=r)

        self.blocks = make(rngs)
        prepend_axis(self.blocks, "layers")
        self.n = n
        self.remat = cfg.remat

    def __call__(self, x, cos, sin, mask) -> tuple[jax.Array, dict]:
        """x [B,S,D] -> x [B,S,D], per-layer stats stacked on a leading L axis."""
        graphdef, state = nnx.split(self.blocks)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask)

        if REMAT[self.remat] is not None:
            body = jax.checkpoint(body, policy=REMAT[self.remat])
        return jax.lax.scan(body, x, state)
