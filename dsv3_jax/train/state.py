"""The train state, created and laid out in one place for every step (GSPMD or pipelined), the
dry run and the tests.

    {"params": nnx.State of Params, "biases": nnx.State of RouterBias, "opt": optax state,
     "step": int32 [], "rng": uint32 [2] key data}

A plain dict of arrays, so orbax saves and restores it as it is (`dsv3_jax/checkpoint.py`).
Under a pipeline whose stages are uneven or V-shaped (DualPipeV) the MoE stack of params, biases and
optimizer moments is kept in that run's slot layout (`parallel/stages.py`, [N C Lm, ...] instead of
[L, ...]); `stages.from_slots` gives the model's own layout back (evaluation, sampling, inference).
Parameters are laid out by the logical-axis rules (`sharding.RULES`), the optimizer state ZeRO-1
over the data-carrying axes, step and rng replicated (`train/layout.py`).
"""

from __future__ import annotations

from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer
from dsv3_jax.moe import RouterBias
from dsv3_jax.parallel import stages as st
from dsv3_jax.train import layout
from dsv3_jax.train.config import OptimConfig
from dsv3_jax.train.optim import decay_mask, make_optimizer


class TrainState(TypedDict):
    params: nnx.State
    biases: nnx.State
    opt: Any
    step: jax.Array
    rng: jax.Array


def split_model(model: Transformer):
    """-> graphdef, params (nnx.Param), biases (RouterBias)."""
    return nnx.split(model, nnx.Param, RouterBias)


def new_state(params: nnx.State, biases: nnx.State, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """The state at step 0 for these weights: fresh optimizer state, step 0, the run's rng."""
    return {"params": params, "biases": biases, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def _fresh(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
           stages: st.StageLayout | None = None) -> TrainState:
    _, params, biases = split_model(Transformer(cfg, rngs=nnx.Rngs(seed)))
    params, biases = st.to_slots(params, stages), st.to_slots(biases, stages)  # None: the model's layout
    return new_state(params, biases, tx, seed)


def convert_layout(state: TrainState, old: st.StageLayout | None, new: st.StageLayout | None) -> TrainState:
    """The state (params, biases and every optimizer leaf under the MoE stack) from one slot layout to
    another (None: the model's own): a resume under another pipeline layout."""
    def move(tree):
        return st.to_slots(st.from_slots(tree, old), new)
    return {**state, "params": move(state["params"]), "biases": move(state["biases"]), "opt": move(state["opt"])}


def abstract_state(cfg: ModelConfig, optim: OptimConfig, seed: int = 0, stages: st.StageLayout | None = None):
    """-> (graphdef, optimizer, the state as ShapeDtypeStructs), the MoE stack in `stages`' slots
    (None: the model's layout). Allocates nothing."""
    graphdef, params, _ = split_model(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
    tx = make_optimizer(optim, decay_mask(params))  # the mask is per leaf name: the same in any layout
    return graphdef, tx, jax.eval_shape(lambda: _fresh(cfg, tx, seed, stages))


def init_state(cfg: ModelConfig, optim: OptimConfig, mesh: Mesh, seed: int = 0,
               stages: st.StageLayout | None = None):
    """-> (graphdef, optimizer, state initialised straight into its shardings on `mesh`, shardings)."""
    graphdef, tx, abstract = abstract_state(cfg, optim, seed, stages)
    shardings = layout.state_shardings(abstract, mesh, cfg)
    state = jax.jit(lambda: _fresh(cfg, tx, seed, stages), out_shardings=shardings)()
    return graphdef, tx, state, shardings
