"""Training parts as the V3 report specifies them: the aux-loss-free bias update, the optimizer
recipe and schedule, the loss terms, and the gin files."""
import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax import Transformer, preset
from dsv3_jax.config import PRESETS, ModelConfig
from dsv3_jax.moe import RouterBias
from dsv3_jax.train.balance import bias_delta, max_over_mean, update_biases
from dsv3_jax.train.config import OptimConfig, TrainConfig
from dsv3_jax.train.optim import decay_mask, lr_schedule, make_optimizer
from dsv3_jax.train.loss import cross_entropy
from dsv3_jax.train.state import new_state, split_model
from dsv3_jax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bias_update_is_gamma_times_sign_of_mean_minus_load():
    load = jnp.array([[10, 2, 6, 6], [0, 0, 0, 24]])
    d = np.asarray(bias_delta(load, 0.001))
    np.testing.assert_allclose(d, [[-0.001, 0.001, 0.0, 0.0], [0.001, 0.001, 0.001, -0.001]])


def test_update_biases_touches_every_moe_layer_and_the_mtp_module_only():
    cfg = preset("tiny")
    _, _, biases = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    load = jnp.arange(3 * 16).reshape(3, 16) % 5
    new = update_biases(biases, load, 0.01, cfg.n_moe_layers)
    want = np.asarray(bias_delta(load, 0.01))
    np.testing.assert_allclose(new["moe_layers"]["blocks"]["ffn"]["gate"]["bias"][...], want[:2])
    np.testing.assert_allclose(new["mtp"][0]["block"]["ffn"]["gate"]["bias"][...], want[2])


def _skewed_model(cfg):
    """Diverse token affinities (gate weights of std ~1/sqrt(dim)) but a router skewed towards
    experts 0-3 by their bias: at the start nearly every token picks the same four experts."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    gate = model.moe_layers.blocks.ffn.gate
    gate.weight[...] = jax.random.normal(jax.random.key(5), gate.weight[...].shape) / np.sqrt(cfg.dim)
    gate.bias[...] = gate.bias[...].at[:, :4].set(1.0)
    return model


@pytest.mark.slow
def test_bias_update_rebalances_a_skewed_router():
    """The bias is visibly alive: from a skewed router, max/mean load falls (lr 0: only the bias moves)."""
    cfg = preset("tiny", vocab_size=128, n_mtp_modules=0)
    graphdef, params, biases = split_model(_skewed_model(cfg))
    run = TrainConfig(batch_size=8, seq_len=32)
    tx = optax.set_to_zero()
    step = jax.jit(make_train_step(graphdef, tx, run, cfg.n_moe_layers))
    state = new_state(params, biases, tx)
    tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, 128)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    history = []
    for _ in range(150):
        state, m = step(state, batch, 0.01, 0.0)
        history.append(np.asarray(m["load_max_over_mean"]))
    first, last = history[0].mean(), np.mean(history[-5:])
    print(f"max/mean load: {first:.2f} -> {last:.2f}")
    assert first > 3.0 and last < 0.5 * first
    np.testing.assert_array_equal(jax.tree.leaves(state["params"])[0], jax.tree.leaves(params)[0])


def test_bias_is_outside_the_gradient_and_the_optimizer():
    cfg = preset("tiny")
    _, params, biases = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    assert not any(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(params))
    assert len(list(nnx.to_flat_state(biases))) == 1 + cfg.n_mtp_modules  # one stacked [L, E] + one per MTP


def test_max_over_mean():
    np.testing.assert_allclose(max_over_mean(jnp.array([[4, 4, 4, 4], [16, 0, 0, 0]])), [1.0, 4.0])


def test_lr_schedule_warmup_constant_cosine_constant():
    cfg = OptimConfig(peak_lr=1.0, final_lr=0.1, warmup_steps=10, constant_steps=5, decay_steps=20)
    f = lr_schedule(cfg)
    assert float(f(0)) == 0.0 and float(f(5)) == pytest.approx(0.5)
    assert float(f(10)) == pytest.approx(1.0) and float(f(14)) == pytest.approx(1.0)
    assert float(f(25)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 10 / 20)), rel=1e-5)
    assert float(f(35)) == pytest.approx(0.1) and float(f(1000)) == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_only():
    cfg = preset("tiny")
    _, params, _ = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    mask = {".".join(map(str, p)): v[...] if isinstance(v, nnx.Variable) else v
            for p, v in nnx.to_flat_state(decay_mask(params))}
    assert mask["moe_layers.blocks.attn.wq_a.weight"] and mask["moe_layers.blocks.ffn.experts.w1"]
    assert mask["embed.weight"] and mask["head"]
    # stacked norms are [L, D]: 2-D arrays but vectors per layer, so no decay
    assert not mask["moe_layers.blocks.attn_norm.weight"] and not mask["norm.weight"]


def test_adamw_recipe_and_bf16_moments():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    cfg = OptimConfig(peak_lr=0.1, warmup_steps=0, weight_decay=0.1, bf16_moments=True)
    tx = make_optimizer(cfg, {"w": True, "b": False})
    state = tx.init(params)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
    grads = {"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))}
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.1 * np.ones((4, 4)), rtol=1e-6)  # decay only
    np.testing.assert_allclose(updates["b"], 0.0)
    big = {"w": jnp.full((4, 4), 100.0), "b": jnp.zeros((4,))}
    clipped, _ = make_optimizer(OptimConfig(warmup_steps=0), {"w": False, "b": False}).update(
        big, make_optimizer(OptimConfig(warmup_steps=0), {"w": False, "b": False}).init(params), params)
    assert np.all(np.isfinite(clipped["w"]))


def test_cross_entropy_with_mask():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    assert float(cross_entropy(logits, jnp.array([[0, 0]]))) == pytest.approx(-(np.log(0.5) + np.log(0.9)) / 2)
    assert float(cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1, 0]]))) == pytest.approx(-np.log(0.5))


def test_chunked_loss_equals_the_full_logits_loss_and_gradients():
    """ModelConfig.loss_chunk: the head's cross entropy a few tokens at a time (MTP depths too, with
    their masks; 24 tokens in chunks of 5 leaves a padded chunk) is the same loss with the same
    gradients as the full [B,S,V] logits."""
    from dsv3_jax.train.step import loss_fn
    cfg = preset("tiny", vocab_size=128, max_seq_len=32)
    graphdef, params, biases = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    toks = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)
    (want, want_aux), want_g = grad(params, biases, graphdef, toks[:, :-1], toks[:, 1:], 0.3, 1e-2)
    chunked = nnx.graphdef(Transformer(cfg.replace(loss_chunk=5), rngs=nnx.Rngs(0)))
    (got, got_aux), got_g = grad(params, biases, chunked, toks[:, :-1], toks[:, 1:], 0.3, 1e-2)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(got_aux["mtp_loss"]) == pytest.approx(float(want_aux["mtp_loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="loss_chunk"):
        cfg.replace(loss_chunk=-1)


def test_state_converts_between_slot_layouts_and_back():
    """A resume on another pipeline layout (train/state.convert_layout): every leaf under the MoE
    stack, optimizer moments included, moves into the slots and back; spare slots are zero."""
    from dsv3_jax.parallel import stages as st
    from dsv3_jax.train.state import convert_layout
    cfg = preset("tiny", n_layers=4, vocab_size=128, max_seq_len=32)  # 3 MoE layers
    _, params, biases = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    state = new_state(params, biases, optax.adam(1e-3))
    state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)  # moments != 0
    v = st.make_layout(cfg, 2, 2)  # DualPipeV's 4 stages on 2 ranks
    even = st.make_layout(cfg, 3, 1)  # one layer per stage: the model's own layout
    assert not v.identity and even.identity
    slotted = convert_layout(state, None, v)
    rows = v.ranks * v.chunks * v.slots
    spare = v.slot_layer.reshape(-1) < 0
    for path, x in jax.tree_util.tree_flatten_with_path(slotted)[0]:
        if any(getattr(k, "key", None) == "moe_layers" for k in path):
            assert x.shape[0] == rows and not np.asarray(x)[spare].any(), jax.tree_util.keystr(path)
    back = convert_layout(convert_layout(slotted, v, even), even, None)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_gin_file_parses_and_model_files_match_the_presets():
    from dsv3_jax.train.main import parse_gin
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.gin"), recursive=True))
    assert files
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for f in files:
            parse_gin([os.path.relpath(f, ROOT)], [])
            if "/model/" in f:
                name = os.path.basename(f)[:-4]
                import gin
                got = gin.get_configurable("ModelConfig")()
                assert got == PRESETS[name], f
    finally:
        import gin
        gin.clear_config()
        os.chdir(cwd)
