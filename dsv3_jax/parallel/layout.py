"""Which training step and which shardings a mesh gets: one answer for train.py, the dry run, the
tests and the benchmark.

  pipeline == 1: `train.step.make_train_step` under GSPMD; with moe_impl="ep" the MoE layers open
                 their own shard_map over the ambient mesh (`jax.set_mesh`).
  pipeline  > 1: `parallel.pipeline.make_pipeline_train_step` (one shard_map over every axis).
Parameters follow the rules table (the pipeline's variant when pipelined); the optimizer state is
ZeRO-1 sharded over the data-carrying axes (`sharding.opt_state_shardings`); step and rng are
replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax import sharding
from dsv3_jax.config import ModelConfig
from dsv3_jax.parallel import pipeline
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.step import make_train_step

EXPERT = dict(sharding.RULES)["exp"]


def pipelined(mesh: Mesh, cfg: ModelConfig | None = None) -> bool:
    """Does this mesh (and model) train with the pipeline schedules? A pipeline axis > 1, and MoE
    that can run inside the manual region: expert parallel, or all experts on each device. (With
    moe_impl "ragged"/"dense" and expert > 1, train.py warns and runs the GSPMD step instead.)"""
    if mesh.shape.get(pipeline.PIPE, 1) == 1:
        return False
    return cfg is None or cfg.moe_impl == "ep" or mesh.shape.get(EXPERT, 1) == 1


def param_shardings(abs_state, mesh: Mesh, cfg: ModelConfig | None = None):
    """NamedShardings for a params or biases State."""
    return (pipeline.state_shardings if pipelined(mesh, cfg) else sharding.state_shardings)(abs_state, mesh)


def opt_shardings(abs_opt, mesh: Mesh, cfg: ModelConfig | None = None):
    """ZeRO-1 NamedShardings for an optax state (or its eval_shape)."""
    rules_for = pipeline.rules_for if pipelined(mesh, cfg) else (lambda path: sharding.RULES)
    return sharding.opt_state_shardings(abs_opt, mesh, rules_for)


def state_shardings(abs_state: dict, mesh: Mesh, cfg: ModelConfig | None = None) -> dict:
    """Shardings for the train state dict {params, biases, opt, step, rng} (arrays or abstract)."""
    replicated = NamedSharding(mesh, P())
    return {"params": param_shardings(abs_state["params"], mesh, cfg),
            "biases": param_shardings(abs_state["biases"], mesh, cfg),
            "opt": opt_shardings(abs_state["opt"], mesh, cfg),
            "step": replicated, "rng": replicated}


def make_step(graphdef, tx, run: TrainConfig, cfg: ModelConfig, mesh: Mesh):
    """step(state, batch, gamma, mtp_lambda) -> (state, metrics) for this mesh."""
    if pipelined(mesh, cfg):
        return pipeline.make_pipeline_train_step(graphdef, tx, run, cfg, mesh)
    return make_train_step(graphdef, tx, run, cfg.n_moe_layers)


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying `shardings` (a prefix tree, e.g. one NamedSharding per Variable)."""
    def attach(sh, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub)
    return jax.tree.map(attach, shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))
