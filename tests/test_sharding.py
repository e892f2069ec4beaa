"""The logical-axis rules table (`sharding.RULES`) as it lands on a real model.

A golden table: every parameter and router bias of the `tiny` preset on a (data=2, pipeline=2,
expert=2) mesh, path -> PartitionSpec, written out so that any change to the rules or to a
variable's logical axes shows up here as a diff. What the table encodes (sharding.py, model.py):
the MoE stack's `layers` axis on "pipeline", routed experts' `exp` axis on "expert", the dense
stack's `dense_layers` axis and the gate's `router` axis replicated, everything else replicated
(no tensor parallelism: V3 report §3.2). Then ZeRO-1 for the Adam moments, the batch layout, and
`logical_to_spec`'s two guards: a mesh axis is used at most once per spec, and only on a dimension
it divides.

(`test_parallel_train.py::test_optax_state_is_what_opt_state_shardings_expects` checks that most
moments get a data-sharded spec; here are the exact specs.)
"""
import jax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.config import preset
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import (batch_sharding, logical_to_spec, make_mesh, opt_state_shardings,
                               state_shardings, zero1_spec)
from dsv3_jax.train.config import OptimConfig
from dsv3_jax.train.optim import decay_mask, make_optimizer
from dsv3_jax.train.state import split_model

DP = ("data", "expert")  # the data-carrying axes: batch and ZeRO-1

# tiny: 3 layers (1 dense + 2 MoE), dim 64, 16 routed experts, 1 MTP module.
GOLDEN_PARAMS = {
    # dense stack [1, ...]: its layers axis is not the pipeline's (it runs on the first stage)
    "dense_layers.blocks.attn.kv_norm.weight": P(None, None),
    "dense_layers.blocks.attn.q_norm.weight": P(None, None),
    "dense_layers.blocks.attn.wkv_a.weight": P(None, None, None),
    "dense_layers.blocks.attn.wkv_b.weight": P(None, None, None),
    "dense_layers.blocks.attn.wo.weight": P(None, None, None),
    "dense_layers.blocks.attn.wq_a.weight": P(None, None, None),
    "dense_layers.blocks.attn.wq_b.weight": P(None, None, None),
    "dense_layers.blocks.attn_norm.weight": P(None, None),
    "dense_layers.blocks.ffn.w1.weight": P(None, None, None),
    "dense_layers.blocks.ffn.w2.weight": P(None, None, None),
    "dense_layers.blocks.ffn.w3.weight": P(None, None, None),
    "dense_layers.blocks.ffn_norm.weight": P(None, None),
    # embedding and head [V, D]: replicated
    "embed.weight": P(None, None),
    "head": P(None, None),
    # MoE stack [2, ...]: layers -> pipeline; routed experts [L, E, F, D] also E -> expert
    "moe_layers.blocks.attn.kv_norm.weight": P("pipeline", None),
    "moe_layers.blocks.attn.q_norm.weight": P("pipeline", None),
    "moe_layers.blocks.attn.wkv_a.weight": P("pipeline", None, None),
    "moe_layers.blocks.attn.wkv_b.weight": P("pipeline", None, None),
    "moe_layers.blocks.attn.wo.weight": P("pipeline", None, None),
    "moe_layers.blocks.attn.wq_a.weight": P("pipeline", None, None),
    "moe_layers.blocks.attn.wq_b.weight": P("pipeline", None, None),
    "moe_layers.blocks.attn_norm.weight": P("pipeline", None),
    "moe_layers.blocks.ffn.experts.w1": P("pipeline", "expert", None, None),
    "moe_layers.blocks.ffn.experts.w2": P("pipeline", "expert", None, None),
    "moe_layers.blocks.ffn.experts.w3": P("pipeline", "expert", None, None),
    "moe_layers.blocks.ffn.gate.weight": P("pipeline", None, None),  # router axis: every device routes over all E
    "moe_layers.blocks.ffn.shared_experts.w1.weight": P("pipeline", None, None),
    "moe_layers.blocks.ffn.shared_experts.w2.weight": P("pipeline", None, None),
    "moe_layers.blocks.ffn.shared_experts.w3.weight": P("pipeline", None, None),
    "moe_layers.blocks.ffn_norm.weight": P("pipeline", None),
    # the MTP module: one unstacked block, so only its routed experts are split
    "mtp.0.block.attn.kv_norm.weight": P(None),
    "mtp.0.block.attn.q_norm.weight": P(None),
    "mtp.0.block.attn.wkv_a.weight": P(None, None),
    "mtp.0.block.attn.wkv_b.weight": P(None, None),
    "mtp.0.block.attn.wo.weight": P(None, None),
    "mtp.0.block.attn.wq_a.weight": P(None, None),
    "mtp.0.block.attn.wq_b.weight": P(None, None),
    "mtp.0.block.attn_norm.weight": P(None),
    "mtp.0.block.ffn.experts.w1": P("expert", None, None),
    "mtp.0.block.ffn.experts.w2": P("expert", None, None),
    "mtp.0.block.ffn.experts.w3": P("expert", None, None),
    "mtp.0.block.ffn.gate.weight": P(None, None),
    "mtp.0.block.ffn.shared_experts.w1.weight": P(None, None),
    "mtp.0.block.ffn.shared_experts.w2.weight": P(None, None),
    "mtp.0.block.ffn.shared_experts.w3.weight": P(None, None),
    "mtp.0.block.ffn_norm.weight": P(None),
    "mtp.0.eh_proj.weight": P(None, None),
    "mtp.0.enorm.weight": P(None),
    "mtp.0.hnorm.weight": P(None),
    "mtp.0.norm.weight": P(None),
    "norm.weight": P(None),
}

# the aux-loss-free router biases (RouterBias, outside the optimizer): follow their gate
GOLDEN_BIASES = {
    "moe_layers.blocks.ffn.gate.bias": P("pipeline", None),
    "mtp.0.block.ffn.gate.bias": P(None),
}

# ZeRO-1: Adam's mu and nu keep the parameter's spec and split their largest still-replicated
# dimension over the data-carrying axes (all of them when they divide it, else the first that does)
GOLDEN_MOMENTS = {
    # [L=2, E=16, F=32, D=64]: `expert` is taken by E, so only `data` is left, on D (the largest)
    "moe_layers.blocks.ffn.experts.w1": P("pipeline", "expert", None, "data"),
    # [L=2, H*(Z+R)=96, Q=32]: both data axes on the larger dimension
    "moe_layers.blocks.attn.wq_b.weight": P("pipeline", DP, None),
    "norm.weight": P(DP),  # [D=64]
    "embed.weight": P(DP, None),  # [V=512, D=64]
}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(2, 2, 2)


@pytest.fixture(scope="module")
def params_biases():
    _, params, biases = split_model(nnx.eval_shape(lambda: Transformer(preset("tiny"), rngs=nnx.Rngs(0))))
    return params, biases


def specs(shardings) -> dict[str, P]:
    """A tree of NamedShardings -> {dot-joined path: PartitionSpec}."""
    leaves = jax.tree.leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): sh.spec for path, sh in leaves}


def _diff(got: dict, want: dict) -> str:
    lines = [f"{k}: got {got.get(k, 'missing')}, golden {want.get(k, 'missing')}"
             for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    return "\n".join(lines)


# ---- parameters -------------------------------------------------------------------------------
def test_every_parameter_of_tiny_has_its_golden_spec(mesh, params_biases):
    got = specs(state_shardings(params_biases[0], mesh))
    assert got == GOLDEN_PARAMS, "\n" + _diff(got, GOLDEN_PARAMS)


def test_router_biases_have_their_golden_spec(mesh, params_biases):
    got = specs(state_shardings(params_biases[1], mesh))
    assert got == GOLDEN_BIASES, "\n" + _diff(got, GOLDEN_BIASES)


def test_no_mesh_axis_appears_twice_in_a_golden_spec():
    for path, spec in {**GOLDEN_PARAMS, **GOLDEN_BIASES, **GOLDEN_MOMENTS}.items():
        axes = [a for e in spec for a in ((e,) if isinstance(e, str) else tuple(e or ()))]
        assert len(axes) == len(set(axes)), (path, spec)


# ---- optimizer state (ZeRO-1) -----------------------------------------------------------------
def test_adam_moments_get_zero1_specs_over_the_data_axes(mesh, params_biases):
    params = params_biases[0]
    opt = jax.eval_shape(make_optimizer(OptimConfig(), decay_mask(params)).init, params)
    shardings = opt_state_shardings(opt, mesh)
    adam = next(s for s in shardings if hasattr(s, "mu"))  # optax.ScaleByAdamState in the chain
    for moment in (adam.mu, adam.nu):
        got = specs(moment)
        assert {k: got[k] for k in GOLDEN_MOMENTS} == GOLDEN_MOMENTS, "\n" + _diff(got, GOLDEN_MOMENTS)
    assert adam.count.spec == P()  # step counters are replicated


def test_zero1_falls_back_to_a_single_axis_when_both_do_not_divide(mesh):
    # [6]: data x expert = 4 does not divide 6, data = 2 does
    assert zero1_spec(P(None), (6,), mesh) == P("data")
    # [3]: nothing divides; the moment stays replicated
    assert zero1_spec(P(None), (3,), mesh) == P(None)


# ---- batches ----------------------------------------------------------------------------------
def test_a_batch_is_split_over_data_and_expert(mesh):
    # [B=8, S=16]: B over data x expert (4 shards of 2 sequences), S whole
    assert batch_sharding(mesh, (8, 16)).spec == P(DP, None)


# ---- logical_to_spec ---------------------------------------------------------------------------
def test_an_axis_that_does_not_divide_the_dimension_leaves_it_replicated(mesh):
    # 3 MoE layers cannot be split over 2 pipeline stages; 16 experts can over 2 expert shards
    assert logical_to_spec(("layers", "exp", "mlp"), (3, 16, 32), mesh) == P(None, "expert", None)
    # a batch of 6 over data x expert (4) does not divide: replicated, not half-split
    assert logical_to_spec(("batch", "seq"), (6, 16), mesh) == P(None, None)


def test_a_mesh_axis_is_used_once_per_spec(mesh):
    # `batch` takes data and expert first, so a following `exp` cannot take expert again
    assert logical_to_spec(("batch", "exp"), (8, 16), mesh) == P(DP, None)
    # two stacked axes on one array: the pipeline goes to the first only
    assert logical_to_spec(("layers", "layers"), (2, 2), mesh) == P("pipeline", None)


def test_a_size_one_mesh_axis_is_never_named():
    flat = make_mesh(8, 1, 1)
    assert logical_to_spec(("layers", "exp", "embed"), (2, 16, 64), flat) == P(None, None, None)


def test_an_unknown_logical_name_raises_key_error(mesh):
    with pytest.raises(KeyError, match="'heads_typo'"):
        logical_to_spec(("heads_typo",), (4,), mesh)
