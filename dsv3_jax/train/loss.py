"""The training loss, one definition for every step (GSPMD and pipelined):

    loss = CE(main head) + lambda * mean_k CE(MTP depth k) + alpha * mean over MoE layers of the
           sequence-wise balance loss

(V3 report eq. 25 for the MTP term, eqs. 17-20 for the balance term; lambda and alpha from
TrainConfig). Shape letters (the package legend): B batch, S sequence, V vocabulary, Dm MTP depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.model import ModelOutput
from dsv3_jax.mtp import shift_tokens


def cross_entropy(logits, targets, mask=None):
    """Mean next-token NLL. logits [B,S,V] f32, targets [B,S] int, mask [B,S] or None."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    mask = mask.astype(nll.dtype)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mtp_loss(mtp_logits, targets):
    """Mean over depths of the MTP cross entropy. mtp_logits [Dm,B,S,V], targets [B,S].

    Depth k at position i predicts the token after t_{i+k}, i.e. targets[:, i+k]; the last k
    positions have no target and are masked.
    """
    S = targets.shape[1]
    per_depth = []
    for k in range(1, mtp_logits.shape[0] + 1):
        valid = jnp.broadcast_to(jnp.arange(S) < S - k, targets.shape)
        per_depth.append(cross_entropy(mtp_logits[k - 1], shift_tokens(targets, k), valid))
    return jnp.mean(jnp.stack(per_depth))


def losses(out: ModelOutput, targets) -> dict:
    """-> {loss: main CE, mtp_loss, balance_sum: the balance losses of the MoE layers in `out`,
    summed (divide by the model's MoE layer count for the mean)}; float32 scalars."""
    ce = cross_entropy(out.logits, targets)
    zero = 0.0 * ce  # not a constant: inside a shard_map it must vary over the mesh like ce
    return {
        "loss": ce,
        "mtp_loss": zero if out.mtp_logits is None else mtp_loss(out.mtp_logits, targets),
        "balance_sum": zero if out.moe is None else out.moe.balance.sum(),
    }


def total(terms: dict, n_balance: int, mtp_lambda, alpha):
    """The optimised scalar from `losses` terms; n_balance: MoE layers (MTP ones included) in the
    whole model, so a pipeline stage's partial balance sum adds up to the mean over stages."""
    return terms["loss"] + mtp_lambda * terms["mtp_loss"] + alpha * terms["balance_sum"] / max(n_balance, 1)


def n_balance_layers(cfg) -> int:
    """MoE layers that report a balance loss: the MoE stack, plus the MTP modules' blocks when MoE."""
    return cfg.n_moe_layers + (cfg.n_mtp_modules if cfg.n_routed_experts else 0)
