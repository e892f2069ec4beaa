"""Remat policies (ModelConfig.remat -> block.REMAT): each one recomputes a different part of the
layers in the backward, none may change a value. Loss and gradients of the tiny model against
remat='none', the MTP block included; the chunked expert-parallel MoE inside the rematerialised
layers; the names the config accepts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import Transformer, preset
from dsv3_jax.block import REMAT
from dsv3_jax.config import REMAT_POLICIES
from dsv3_jax.errors import ConfigError
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.state import split_model
from dsv3_jax.train.step import loss_fn

CFG = preset("tiny", vocab_size=128)  # 1 dense + 2 MoE layers, one MTP module
TOKENS = jax.random.randint(jax.random.key(3), (2, 17), 0, CFG.vocab_size)


def _loss_and_grads(cfg):
    g, p, b = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, b, g, TOKENS[:, :-1], TOKENS[:, 1:], 0.3, 1e-4)[0]))
    return f(p)


def _assert_same(got, want, rtol):
    (loss, grads), (loss_ref, grads_ref) = got, want
    np.testing.assert_allclose(loss, loss_ref, rtol=rtol)
    flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(flat) == len(flat_ref)
    for a, b in zip(flat, flat_ref):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max() + 1e-30))


def test_policy_names_match_the_config():
    assert tuple(REMAT) == REMAT_POLICIES


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_loss_and_gradients_of_no_remat(policy):
    """offload_attn_moe runs on CPU too: its host copies lower to no transfer there (the CPU's
    device memory is host memory), so it must give the same numbers as the rest."""
    _assert_same(_loss_and_grads(CFG.replace(remat=policy)), _loss_and_grads(CFG), rtol=1e-5)


@pytest.mark.parametrize("policy", ["full"])  # save_attn_moe: covered by the policy test above
def test_chunked_expert_parallel_moe_under_remat(policy):
    """moe_impl='ep' with ep_chunks=0 (one chunk per source shard, each under its own
    jax.checkpoint) nested in the rematerialised layer scan: same loss and gradients as one pass
    without remat."""
    cfg = CFG.replace(moe_impl="ep", ep_dispatch="fp32", ep_combine="fp32")
    with jax.set_mesh(make_mesh(1, 1, 8)):
        want = _loss_and_grads(cfg)
        got = _loss_and_grads(cfg.replace(remat=policy, ep_chunks=0))
    _assert_same(got, want, rtol=1e-5)


def test_unknown_policy_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"ModelConfig.remat='save_all'.*'save_attn_moe', 'offload_attn_moe'"):
        CFG.replace(remat="save_all")


def test_tiled_moe_in_the_rematerialised_layers_matches_the_dense_reference():
    """moe_impl='tiled' (experts.tiled_swiglu: a custom VJP that keeps its own residuals and gathers
    the tile rows again in the backward) inside the rematerialised layer scan and in the MTP block:
    the loss and every gradient of the every-expert-on-every-token reference."""
    want = _loss_and_grads(CFG.replace(moe_impl="dense", remat="full"))
    _assert_same(_loss_and_grads(CFG.replace(moe_impl="tiled", remat="full")), want, rtol=1e-4)


def test_tiled_moe_gradients_at_the_small_presets_dims():
    """A case the previous tiled VJP got wrong (expert and gate gradients off by up to 22% of their
    largest entry, the loss equal): the `small` preset's dims with two scanned MoE layers, 4 x 256
    tokens drawn from key 1 (tiles of 64 rows). The same code was right with XLA:CPU's YNN fusions
    off or at optimization level 0: a miscompile of that program, pinned here (docs/BENCHMARKS.md)."""
    cfg = preset("small", n_layers=3)
    tokens = jax.random.randint(jax.random.key(1), (4, 257), 0, cfg.vocab_size)

    def loss_and_grads(impl):
        g, p, b = split_model(nnx.jit(lambda: Transformer(cfg.replace(moe_impl=impl), rngs=nnx.Rngs(0)))())
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, b, g, tokens[:, :-1], tokens[:, 1:], 0.3, 1e-4)[0]))(p)

    _assert_same(loss_and_grads("tiled"), loss_and_grads("dense"), rtol=1e-4)
