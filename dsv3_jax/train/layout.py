"""Which training step and which shardings a mesh gets: one answer for train.py, the dry run, the
tests and the benchmark.

  pipeline == 1: `train.step.make_train_step` under GSPMD; with moe_impl="ep" the MoE layers open
                 their own shard_map over the ambient mesh (`jax.set_mesh`).
  pipeline  > 1: `train.pipeline.make_pipeline_train_step` (one shard_map over every axis).
Under a pipeline with uneven or V-shaped stages the state keeps the MoE stack in that pipeline's
slot layout (`stage_layout`; `parallel/stages.py`). Either way parameters follow the one rules
table (`sharding.RULES`, by their logical axis names);
the optimizer state is ZeRO-1 sharded over the data-carrying axes (`sharding.opt_state_shardings`);
step and rng are replicated.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax import sharding
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.parallel.stages import StageLayout
from dsv3_jax.train import pipeline
from dsv3_jax.train.config import MeshConfig, TrainConfig
from dsv3_jax.train.step import make_train_step

EXPERT = dict(sharding.RULES)["exp"]


def pipelined(mesh: Mesh, cfg: ModelConfig | None = None) -> bool:
    """Does this mesh (and model) train with the pipeline schedules? A pipeline axis > 1, and MoE
    that can run inside the manual region: expert parallel, or all experts on each device. (With
    moe_impl "ragged"/"dense" and expert > 1, train.py warns and runs the GSPMD step instead.)"""
    if mesh.shape.get(pipeline.PIPE, 1) == 1:
        return False
    return cfg is None or cfg.moe_impl == "ep" or mesh.shape.get(EXPERT, 1) == 1


def check_layout(model: ModelConfig, run: TrainConfig, mesh: MeshConfig, n_devices: int) -> str | None:
    """Clear errors, before anything compiles, for a mesh the model or the batch cannot use.
    -> a warning to print, or None."""
    if mesh.size != n_devices:
        raise ConfigError(f"MeshConfig data={mesh.data} x pipeline={mesh.pipeline} x expert={mesh.expert} "
                          f"= {mesh.size} devices, but jax sees {n_devices}")
    if model.n_routed_experts % mesh.expert:
        raise ConfigError(f"MeshConfig.expert={mesh.expert} must divide n_routed_experts={model.n_routed_experts}")
    dp = mesh.data * mesh.expert
    if (run.batch_size // run.grad_accum) % dp:
        raise ConfigError(f"TrainConfig.batch_size={run.batch_size} / grad_accum={run.grad_accum} must be "
                          f"divisible by the data-parallel degree data x expert = {dp}")
    if run.seq_len > model.max_seq_len:
        raise ConfigError(f"TrainConfig.seq_len={run.seq_len} exceeds ModelConfig.max_seq_len={model.max_seq_len}")
    if mesh.pipeline > 1 and (model.moe_impl == "ep" or mesh.expert == 1):  # the pipelined step
        if run.grad_accum != 1:
            raise ConfigError(f"TrainConfig.grad_accum={run.grad_accum}: with MeshConfig.pipeline > 1 the "
                              "pipeline's micro-batches (TrainConfig.pipeline_microbatches) accumulate; use 1")
        pipeline.check_pipeline_layout(model, mesh.pipeline, run.pipeline_microbatches, run.batch_size // dp,
                                       mesh.expert, run.pipeline_schedule, run.pipeline_stage_layers)
    elif mesh.pipeline > 1:
        return (f"MeshConfig.pipeline={mesh.pipeline} with expert={mesh.expert} needs "
                f"ModelConfig.moe_impl='ep' for the pipeline schedules; moe_impl={model.moe_impl!r} runs the "
                "GSPMD step (layers sharded over the pipeline axis, no schedule)")
    return None


def stage_layout(cfg: ModelConfig, run: TrainConfig, mesh: Mesh) -> StageLayout | None:
    """The slot layout the train state keeps its MoE stack in on this mesh (`parallel/stages.py`):
    the pipeline's, where it is uneven or V-shaped (DualPipeV); None where it is the model's own
    [L, ...] (no pipeline, or an even split with one stage per device)."""
    if not pipelined(mesh, cfg):
        return None
    stages = pipeline.stage_layout(cfg, mesh.shape[pipeline.PIPE], run.pipeline_schedule, run.pipeline_stage_layers)
    return None if stages.identity else stages


def state_shardings(abs_state: dict, mesh: Mesh, cfg: ModelConfig | None = None) -> dict:
    """Shardings for the train state dict {params, biases, opt, step, rng} (arrays or abstract)."""
    replicated = NamedSharding(mesh, P())
    return {"params": sharding.state_shardings(abs_state["params"], mesh),
            "biases": sharding.state_shardings(abs_state["biases"], mesh),
            "opt": sharding.opt_state_shardings(abs_state["opt"], mesh),
            "step": replicated, "rng": replicated}


def make_step(graphdef, tx, run: TrainConfig, cfg: ModelConfig, mesh: Mesh):
    """step(state, batch, gamma, mtp_lambda) -> (state, metrics) for this mesh."""
    if pipelined(mesh, cfg):
        return pipeline.make_pipeline_train_step(graphdef, tx, run, cfg, mesh)
    return make_train_step(graphdef, tx, run, cfg.n_moe_layers)
