"""Aux-loss-free load balancing (V3 report §2.1.2).

After every step each MoE layer's `e_score_correction_bias` moves by gamma * sign(mean load - load),
with the load counted over the whole global batch: overloaded experts get b -= gamma, underloaded
ones b += gamma. The bias only steers expert selection, so this runs outside the gradient: no
optimizer state, no weight decay. (MaxText and HF shipped this bias frozen by mistake.)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def bias_delta(load, gamma):
    """load [L, E] token counts -> the bias change [L, E]."""
    load = load.astype(jnp.float32)
    return gamma * jnp.sign(load.mean(axis=-1, keepdims=True) - load)


def update_biases(biases: nnx.State, load, gamma, n_moe_layers: int) -> nnx.State:
    """Apply the update to the model's RouterBias state ([L_moe, E] scanned, then one [E] per MTP module).

    `load` rows follow ModelOutput.moe.load: the scanned MoE layers first, then the MTP modules.
    """
    delta = bias_delta(load, gamma)
    updated = []
    for path, var in nnx.to_flat_state(biases):
        d = delta[:n_moe_layers] if path[0] == "moe_layers" else delta[n_moe_layers + path[1]]
        updated.append((path, var.replace(var[...] + d)))
    return nnx.from_flat_state(updated)


def max_over_mean(load):
    """[L, E] -> [L]: how far the busiest expert is above the mean (1.0 is perfect balance)."""
    load = load.astype(jnp.float32)
    return load.max(axis=-1) / jnp.maximum(load.mean(axis=-1), 1e-9)
