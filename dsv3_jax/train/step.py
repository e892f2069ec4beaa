"""The GSPMD training step: loss and gradients over micro-batches, then the one state update
(`apply_gradients`: AdamW and the aux-loss-free bias update) that the pipelined step shares.

Shape letters (the package legend): B batch, M micro-batches, S sequence, L MoE layers (+ MTP),
E experts.

The state is the dict of `train/state.py`: {"params", "biases", "opt", "step", "rng"}. Biases are
separate from params so that gradients, Adam and weight decay never touch them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.parallel import stages as st
from dsv3_jax.train import loss as L
from dsv3_jax.train.balance import max_over_mean, update_biases
from dsv3_jax.train.config import TrainConfig


def loss_fn(params, biases, graphdef, inputs, targets, mtp_lambda, alpha, overlap: bool = False):
    """-> total loss, aux {loss, mtp_loss, balance_loss, load [L,E]}."""
    model = nnx.merge(graphdef, params, biases)
    chunk = model.cfg.loss_chunk
    out = model.forward(inputs, overlap=overlap, logits=not chunk)
    terms = L.losses(out, targets, model.head[...], chunk)
    n = L.n_balance_layers(model.cfg)
    aux = {"loss": terms["loss"], "mtp_loss": terms["mtp_loss"], "balance_loss": terms["balance_sum"] / max(n, 1),
           "load": out.moe.load if out.moe is not None else jnp.zeros((0, 1), jnp.int32)}
    return L.total(terms, n, mtp_lambda, alpha), aux


def apply_gradients(state, grads, load, tx: optax.GradientTransformation, gamma, n_moe_layers: int):
    """The one state update of every step: AdamW on the params, the bias update from the global
    batch's expert load [L,E] -> (new state, {grad_norm, expert_load, load_max_over_mean})."""
    params, biases = state["params"], state["biases"]
    updates, opt = tx.update(grads, state["opt"], params)
    new_state = {
        "params": optax.apply_updates(params, updates),
        "biases": update_biases(biases, load, gamma, n_moe_layers) if load.shape[0] else biases,
        "opt": opt,
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    metrics = {"grad_norm": optax.tree.norm(grads), "expert_load": load,
               "load_max_over_mean": max_over_mean(load) if load.shape[0] else jnp.zeros((0,))}
    return new_state, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig, n_moe_layers: int):
    """Returns step(state, batch, gamma, mtp_lambda) -> (state, metrics); batch {inputs, targets} [B,S]."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch, gamma, mtp_lambda):
        params, biases = state["params"], state["biases"]
        M = cfg.grad_accum
        micro = jax.tree.map(lambda x: x.reshape(M, x.shape[0] // M, *x.shape[1:]), batch)

        def grads_of(mb):
            return grad_fn(params, biases, graphdef, mb["inputs"], mb["targets"], mtp_lambda, cfg.balance_alpha,
                           cfg.overlap_microbatches)

        def one(carry, mb):
            (_, aux), grads = grads_of(mb)
            return jax.tree.map(jnp.add, carry, (grads, aux)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        aux0 = jax.eval_shape(lambda: grads_of(jax.tree.map(lambda x: x[0], micro))[0][1])
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
        (grads, aux), _ = jax.lax.scan(one, (zeros, aux0), micro)
        grads = jax.tree.map(lambda g: g / M, grads)
        load = aux.pop("load")  # summed over micro-batches: the global batch's counts
        new_state, update_metrics = apply_gradients(state, grads, load, tx, gamma, n_moe_layers)
        return new_state, {**{k: v / M for k, v in aux.items()}, **update_metrics}

    return step


def make_eval_step(graphdef, stages: st.StageLayout | None = None):
    """eval_step(state, batch) -> validation losses, on the GSPMD forward of the model's own layout
    (a state kept in a pipeline's slot layout, `stages`, is gathered back into layer order first)."""
    def eval_step(state, batch):
        params, biases = st.from_slots(state["params"], stages), st.from_slots(state["biases"], stages)
        _, aux = loss_fn(params, biases, graphdef, batch["inputs"], batch["targets"], 0.0, 0.0)
        return {"val_loss": aux["loss"], "val_mtp_loss": aux["mtp_loss"]}
    return eval_step
