"""The training step: loss (next token + MTP + sequence-wise balance), gradients over micro-batches,
AdamW, and the aux-loss-free bias update, as one jitted function over a pytree of state.

Shape letters: B batch, A micro-batches, S sequence, V vocabulary, L MoE layers (+ MTP), E experts.

The state is a plain dict: {"params": nnx.State of Params, "biases": nnx.State of RouterBias,
"opt": optax state, "step": int32, "rng": uint32 key data}. Biases are separate from params so that
gradients, Adam and weight decay never touch them.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.model import Transformer
from dsv3_jax.moe import RouterBias
from dsv3_jax.mtp import shift_tokens
from dsv3_jax.train.balance import max_over_mean, update_biases
from dsv3_jax.train.config import TrainConfig


def cross_entropy(logits, targets, mask=None):
    """Mean next-token NLL. logits [B,S,V] f32, targets [B,S] int, mask [B,S] or None."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    mask = mask.astype(nll.dtype)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def loss_fn(params, biases, graphdef, inputs, targets, mtp_lambda, alpha):
    """-> total loss, aux {loss, mtp_loss, balance, load [L,E]}."""
    model = nnx.merge(graphdef, params, biases)
    out = model.forward(inputs)
    ce = cross_entropy(out.logits, targets)
    mtp_loss = jnp.zeros((), jnp.float32)
    if out.mtp_logits is not None:
        S = targets.shape[1]
        per_depth = []
        for k in range(1, out.mtp_logits.shape[0] + 1):
            # depth k at position i predicts the token after t_{i+k}, i.e. targets[:, i+k]
            valid = jnp.broadcast_to(jnp.arange(S) < S - k, targets.shape)
            per_depth.append(cross_entropy(out.mtp_logits[k - 1], shift_tokens(targets, k), valid))
        mtp_loss = jnp.mean(jnp.stack(per_depth))
    balance = out.moe_balance.mean() if out.moe_balance is not None else jnp.zeros((), jnp.float32)
    total = ce + mtp_lambda * mtp_loss + alpha * balance
    load = out.moe_load if out.moe_load is not None else jnp.zeros((0, 1), jnp.int32)
    return total, {"loss": ce, "mtp_loss": mtp_loss, "balance_loss": balance, "load": load}


def split_model(model: Transformer):
    """-> graphdef, params (nnx.Param), biases (RouterBias)."""
    return nnx.split(model, nnx.Param, RouterBias)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig, n_moe_layers: int):
    """Returns step(state, batch, gamma, mtp_lambda) -> (state, metrics); batch {inputs, targets} [B,S]."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch, gamma, mtp_lambda):
        params, biases = state["params"], state["biases"]
        A = cfg.grad_accum
        micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)

        def one(carry, mb):
            (_, aux), grads = grad_fn(params, biases, graphdef, mb["inputs"], mb["targets"], mtp_lambda,
                                      cfg.balance_alpha)
            g_acc, aux_acc = carry
            return (jax.tree.map(jnp.add, g_acc, grads), jax.tree.map(jnp.add, aux_acc, aux)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        aux0 = jax.eval_shape(lambda: grad_fn(params, biases, graphdef, micro["inputs"][0], micro["targets"][0],
                                              mtp_lambda, cfg.balance_alpha)[0][1])
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
        (grads, aux), _ = jax.lax.scan(one, (zeros, aux0), micro)
        grads = jax.tree.map(lambda g: g / A, grads)
        load = aux.pop("load")  # summed over micro-batches: the global batch's counts
        metrics = {k: v / A for k, v in aux.items()}
        updates, opt = tx.update(grads, state["opt"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "biases": update_biases(biases, load, gamma, n_moe_layers) if load.shape[0] else biases,
            "opt": opt,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics.update(grad_norm=optax.tree.norm(grads), expert_load=load,
                       load_max_over_mean=max_over_mean(load) if load.shape[0] else jnp.zeros((0,)))
        return new_state, metrics

    return step


def make_eval_step(graphdef):
    def eval_step(state, batch):
        _, aux = loss_fn(state["params"], state["biases"], graphdef, batch["inputs"], batch["targets"], 0.0, 0.0)
        return {"val_loss": aux["loss"], "val_mtp_loss": aux["mtp_loss"]}
    return eval_step
