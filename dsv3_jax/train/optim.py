"""DeepSeek's optimizer recipe in optax (V3 report §4.2, §3.3.3).

AdamW (beta1 0.9, beta2 0.95, weight decay 0.1 on matrices only) after global-norm clipping at 1.0,
with a warmup -> constant -> cosine -> constant learning-rate schedule. `bf16_moments` keeps both
Adam moments in BF16 between steps while the update math and the master weights stay FP32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.train.config import OptimConfig


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """0 -> peak over warmup, peak for constant_steps, cosine to final over decay_steps, then final."""
    parts, bounds, t = [], [], 0
    if cfg.warmup_steps:
        parts.append(optax.linear_schedule(0.0, cfg.peak_lr, cfg.warmup_steps))
        t += cfg.warmup_steps
        bounds.append(t)
    if cfg.constant_steps:
        parts.append(optax.constant_schedule(cfg.peak_lr))
        t += cfg.constant_steps
        bounds.append(t)
    if cfg.decay_steps:
        parts.append(optax.cosine_decay_schedule(cfg.peak_lr, cfg.decay_steps, alpha=cfg.final_lr / cfg.peak_lr))
        bounds.append(t + cfg.decay_steps)
        parts.append(optax.constant_schedule(cfg.final_lr))
    else:
        parts.append(optax.constant_schedule(cfg.peak_lr))
    return optax.join_schedules(parts, bounds[: len(parts) - 1])


def decay_mask(params: nnx.State):
    """True for matrices: a parameter with >= 2 dims besides the stacked `layers` axis."""
    def is_matrix(var):
        return len([a for a in var.get_metadata()["logical_axes"] if a != "layers"]) >= 2
    return jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def bf16_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Store `inner`'s floating state (the Adam moments) in BF16; compute in FP32."""
    def init(params):
        return _cast_floats(inner.init(params), jnp.bfloat16)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, _cast_floats(state, jnp.float32), params)
        return updates, _cast_floats(state, jnp.bfloat16)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, mask) -> optax.GradientTransformation:
    adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.bf16_moments:
        adam = bf16_state(adam)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        adam,
        optax.add_decayed_weights(cfg.weight_decay, mask=mask),
        optax.scale_by_learning_rate(lr_schedule(cfg)),
    )
