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
from dsv3_jax.vma import vary_like


def cross_entropy(logits, targets, mask=None):
    """Mean next-token NLL. logits [B,S,V] f32, targets [B,S] int, mask [B,S] or None."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    mask = mask.astype(nll.dtype)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def chunked_cross_entropy(h, head, targets, mask=None, chunk: int = 1024):
    """cross_entropy(h @ head^T, targets, mask) without the [B,S,V] logits: `chunk` tokens at a time
    in a scan, each chunk's logits recomputed in the backward (jax.checkpoint), so one chunk's
    [chunk, V] float32 logits are live instead of the whole sequence's (V3: 2 GiB per 4096 tokens,
    and a few copies in the backward). h [B,S,D] normalised, head [V,D], targets [B,S] int."""
    D = h.shape[-1]
    h, targets = h.reshape(-1, D), targets.reshape(-1)
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    chunk = min(chunk, h.shape[0])
    pad = -h.shape[0] % chunk  # padded tokens are masked out
    h, targets, mask = (jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (h, targets, mask))
    w = head.astype(h.dtype)

    @jax.checkpoint
    def nll_sum(hc, tc, mc):
        logits = jnp.einsum("td,vd->tv", hc, w, preferred_element_type=jnp.float32)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return (nll * mc).sum()

    def body(total, xs):
        return total + nll_sum(*xs), None
    split = lambda x: x.reshape(-1, chunk, *x.shape[1:])  # noqa: E731
    zero = vary_like(jnp.zeros((), jnp.float32), h, w, targets, mask)  # inside a shard_map: varies as they do
    total, _ = jax.lax.scan(body, zero, (split(h), split(targets), split(mask)))
    return total / jnp.maximum(mask.sum(), 1.0)


def mtp_loss(ce, n_depths: int, targets):
    """Mean over depths of the MTP cross entropy; ce(k, targets_k, mask_k) is depth k's.

    Depth k at position i predicts the token after t_{i+k}, i.e. targets[:, i+k]; the last k
    positions have no target and are masked.
    """
    S = targets.shape[1]
    per_depth = []
    for k in range(1, n_depths + 1):
        valid = jnp.broadcast_to(jnp.arange(S) < S - k, targets.shape)
        per_depth.append(ce(k, shift_tokens(targets, k), valid))
    return jnp.mean(jnp.stack(per_depth))


def losses(out: ModelOutput, targets, head=None, chunk: int = 0) -> dict:
    """-> {loss: main CE, mtp_loss, balance_sum: the balance losses of the MoE layers in `out`,
    summed (divide by the model's MoE layer count for the mean)}; float32 scalars.

    `out` holds logits, or (Transformer.forward(logits=False)) the normalised hidden states, whose
    logits against `head` [V,D] are then taken `chunk` tokens at a time (chunked_cross_entropy)."""
    if out.logits is not None:
        ce = cross_entropy(out.logits, targets)
        mtp = out.mtp_logits
        depth_ce = lambda k, t, m: cross_entropy(mtp[k - 1], t, m)  # noqa: E731
    else:
        ce = chunked_cross_entropy(out.hidden, head, targets, None, chunk)
        mtp = out.mtp_hidden
        depth_ce = lambda k, t, m: chunked_cross_entropy(mtp[k - 1], head, t, m, chunk)  # noqa: E731
    zero = 0.0 * ce  # not a constant: inside a shard_map it must vary over the mesh like ce
    return {
        "loss": ce,
        "mtp_loss": zero if mtp is None else mtp_loss(depth_ce, mtp.shape[0], targets),
        "balance_sum": zero if out.moe is None else out.moe.balance.sum(),
    }


def total(terms: dict, n_balance: int, mtp_lambda, alpha):
    """The optimised scalar from `losses` terms; n_balance: MoE layers (MTP ones included) in the
    whole model, so a pipeline stage's partial balance sum adds up to the mean over stages."""
    return terms["loss"] + mtp_lambda * terms["mtp_loss"] + alpha * terms["balance_sum"] / max(n_balance, 1)


def n_balance_layers(cfg) -> int:
    """MoE layers that report a balance loss: the MoE stack, plus the MTP modules' blocks when MoE."""
    return cfg.n_moe_layers + (cfg.n_mtp_modules if cfg.n_routed_experts else 0)
