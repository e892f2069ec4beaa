"""The attention seam: blockwise (flash) attention and the splash kernel (interpret mode) against the
reference in values and gradients (float32: 1e-5 of the largest reference value), on training, padded,
shared-key, cached-decode and fully masked shapes; no [S,T] score array per head in the blockwise
program (its jaxpr, XLA's temp bytes); the model's loss, gradients and cached prefill with
attn_impl="blockwise"; the GPU kernels on a GPU."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import Transformer, preset
from dsv3_jax.attention import IMPLS, attention, reference_attention
from dsv3_jax.cache import init_cache
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.flash_attention import FlashTuning, blockwise_attention, splash_attention
from dsv3_jax.train.state import split_model
from dsv3_jax.train.step import loss_fn

V3_SCALE = preset("v3_671b").softmax_scale  # 192 ** -0.5 times YaRN's mscale^2 (rope_factor 40)


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    bound = tol * max(1.0, float(np.abs(want).max()))
    assert err.max() <= bound, f"{what}: max err {err.max():.3e} (mean {err.mean():.3e}) > {bound:.3e}"


def make_inputs(B, S, T, H, Hk, Dk, Dv, *, positions="random", empty_rows=0, dtype=jnp.float32, seed=0):
    """q, k, v and a causal-in-positions mask [B,S,T]. positions "train": q and kv at 0..S-1 (S = T);
    "random": each row's S queries at its own positions < T against the T slots 0..T-1 (cached decode);
    `empty_rows`: that many rows of batch row 0 see no key. Built in numpy: eager jax ops on new
    shapes would each compile."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
               for shape in ((B, S, H, Dk), (B, T, Hk, Dk), (B, T, Hk, Dv)))
    if positions == "train":
        q_pos = np.broadcast_to(np.arange(S), (B, S))
    else:
        q_pos = np.sort(rng.integers(0, T, (B, S)), axis=1)
    mask = np.arange(T)[None, None, :] <= q_pos[:, :, None]  # causal_mask, in numpy
    mask[0, :empty_rows] = False
    return q, k, v, jnp.asarray(mask)


def values_and_grads(fn, q, k, v, mask, scale):
    """out, and d(sum(out * w))/d(q, k, v) for a fixed random w."""
    w = np.random.default_rng(9).standard_normal((*q.shape[:3], v.shape[-1]), np.float32)

    def loss(q, k, v):
        out = fn(q, k, v, mask, scale=scale)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def check_against_reference(fn, inputs, scale, tol, what):
    want, want_g = values_and_grads(reference_attention, *inputs, scale)
    got, got_g = values_and_grads(fn, *inputs, scale)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert_close(got, want, tol, f"{what} out")
    for name, g, h in zip("qkv", got_g, want_g):
        assert g.shape == h.shape and g.dtype == h.dtype
        assert_close(g, h, tol, f"{what} d{name}")


# (id, B, S, T, H, Hk, Dk, Dv, positions, empty rows, block_q, block_kv); every case has B > 1 rows
# with their own positions and several key tiles, most have rows that see no key.
CASES = [
    ("train-v3-dims-padded", 2, 50, 50, 2, 2, 192, 128, "train", 3, 16, 32),
    ("train-blocks-divide-shared-kv", 2, 64, 64, 4, 1, 40, 32, "train", 0, 16, 16),
    ("decode-absorbed-dims", 2, 2, 100, 4, 1, 576, 512, "random", 1, 16, 32),
    ("decode-1-token", 3, 1, 70, 4, 4, 24, 16, "random", 1, 16, 16),
    ("prefill-into-longer-cache", 2, 37, 53, 4, 4, 24, 16, "random", 2, 8, 16),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_blockwise_equals_reference_in_values_and_gradients(case):
    name, B, S, T, H, Hk, Dk, Dv, positions, empty, bq, bk = case
    inputs = make_inputs(B, S, T, H, Hk, Dk, Dv, positions=positions, empty_rows=empty)
    fn = lambda *a, scale: blockwise_attention(*a, scale=scale, tuning=FlashTuning(bq, bk))  # noqa: E731
    check_against_reference(fn, inputs, V3_SCALE, 1e-5, name)


def test_blockwise_runs_inside_a_shard_map_like_outside():
    """Pipeline stages run the model inside a shard_map manual over every mesh axis: the blockwise
    loops must start from carries that vary like their inputs (values and gradients as outside)."""
    from jax.sharding import PartitionSpec as P

    from dsv3_jax.sharding import make_mesh
    mesh = make_mesh(2, 2, 2)
    q, k, v, mask = make_inputs(8, 20, 20, 2, 2, 24, 16, positions="train", empty_rows=0)
    fn = lambda q, k, v, m: blockwise_attention(q, k, v, m, scale=V3_SCALE, tuning=FlashTuning(8, 8))  # noqa: E731
    loss = lambda *a: (fn(*a) ** 2).sum()  # noqa: E731
    rows = P(("data", "pipeline", "expert"))
    inside = jax.jit(jax.shard_map(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)), mesh=mesh,
                                   in_specs=(rows,) * 4, out_specs=(rows, (rows,) * 3)))
    (got, got_g), want, want_g = inside(q, k, v, mask), fn(q, k, v, mask), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, mask)
    assert_close(got, want, 1e-5, "shard_map out")
    for name, g, h in zip("qkv", got_g, want_g):
        assert_close(g, h, 1e-5, f"shard_map d{name}")


def test_blockwise_in_bfloat16_matches_the_reference_to_bfloat16_rounding():
    inputs = make_inputs(2, 50, 50, 4, 1, 40, 32, positions="train", empty_rows=3, dtype=jnp.bfloat16)
    fn = lambda *a, scale: blockwise_attention(*a, scale=scale, tuning=FlashTuning(16, 16))  # noqa: E731
    check_against_reference(fn, inputs, V3_SCALE, 2 ** -7, "bf16")


def test_a_row_that_sees_no_key_gets_the_references_uniform_softmax():
    """The reference's NEG_INF is finite: such a row averages v over all T slots. Blockwise gives the
    same value (its tiles all skipped) and its gradient reaches every slot's value equally."""
    q, k, v, mask = make_inputs(1, 32, 32, 2, 2, 24, 16, positions="train", empty_rows=8)
    row = jax.jit(lambda v: blockwise_attention(q, k, v, mask, scale=0.2, tuning=FlashTuning(8, 8))[0, 5])
    np.testing.assert_allclose(row(v), v[0].mean(0), rtol=1e-6, atol=1e-6)
    dv = jax.jit(jax.grad(lambda v: row(v).sum()))(v)
    np.testing.assert_allclose(dv[0], np.full((32, 2, 16), 1 / 32), rtol=1e-6)


# ---- memory: no [S,T] per head --------------------------------------------------------------------
def _avals(jaxpr):
    """Every intermediate's abstract value in a jaxpr and the jaxprs nested in it (loops, conds)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _avals(sub)


def _grad_fn(fn, scale=V3_SCALE):
    return jax.grad(lambda q, k, v, mask: jnp.sum(fn(q, k, v, mask, scale=scale)), argnums=(0, 1, 2))


def test_blockwise_program_has_no_score_array_spanning_queries_and_keys():
    """Forward and backward at S = T = 1024 with 128 x 128 tiles: no float intermediate has both a
    1024-long query and a 1024-long key axis (the reference's program does)."""
    inputs = make_inputs(1, 1024, 1024, 2, 2, 192, 128, positions="train")
    blockwise = lambda *a, scale: blockwise_attention(*a, scale=scale, tuning=FlashTuning(128, 128))  # noqa: E731

    def float_shapes(fn):
        avals = _avals(jax.make_jaxpr(_grad_fn(fn))(*inputs).jaxpr)
        return {tuple(a.shape) for a in avals if jnp.issubdtype(a.dtype, jnp.floating)}

    def square(shapes):
        return sorted(s for s in shapes if s.count(1024) >= 2)

    assert square(float_shapes(reference_attention)), "the check must see the reference's [B,H,S,T] scores"
    blockwise_shapes = float_shapes(blockwise)
    assert (1, 128, 2, 128) in blockwise_shapes, "the walk must reach the loop bodies' [B,bq,H,bk] tiles"
    assert not square(blockwise_shapes), square(blockwise_shapes)


def test_blockwise_needs_a_fraction_of_the_references_xla_temp_memory():
    """XLA's temp bytes of forward + backward at S = T = 2048 (B = 1, H = 2, 192/128 dims): the
    reference holds several [H,S,T] float32 arrays; blockwise less than one."""
    inputs = make_inputs(1, 2048, 2048, 2, 2, 192, 128, positions="train")
    one_score_array = 2 * 2048 * 2048 * 4
    blockwise = lambda *a, scale: blockwise_attention(*a, scale=scale)  # noqa: E731
    temp = {name: jax.jit(_grad_fn(fn)).lower(*inputs).compile().memory_analysis().temp_size_in_bytes
            for name, fn in (("reference", reference_attention), ("blockwise", blockwise))}
    print({k: f"{v / 2 ** 20:.1f} MiB" for k, v in temp.items()})
    assert temp["reference"] >= 2 * one_score_array
    assert temp["blockwise"] < one_score_array / 2 and temp["blockwise"] * 10 < temp["reference"]


# ---- the model through the seam -------------------------------------------------------------------
# One dense layer, no MTP: the rest adds compile time, not attention calls of another kind.
CFG = preset("tiny", vocab_size=128, n_layers=1, n_dense_layers=1, n_routed_experts=0, n_mtp_modules=0)


def _loss_and_grads(cfg, tokens):
    g, p, b = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, b, g, tokens[:, :-1], tokens[:, 1:], 0.3, 1e-4)[0]))
    return f(p)


def test_model_loss_and_gradients_with_blockwise_attention_equal_the_reference():
    """160 tokens: two 128-query blocks (the second padded), the causal upper tile skipped."""
    tokens = jax.random.randint(jax.random.key(1), (2, 161), 0, CFG.vocab_size)
    (l_ref, g_ref), (l_blk, g_blk) = (_loss_and_grads(CFG.replace(attn_impl=impl), tokens)
                                      for impl in ("reference", "blockwise"))
    assert abs(float(l_blk) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_ref)[0], jax.tree.leaves(g_blk)):
        assert_close(b, a, 1e-5, jax.tree_util.keystr(path))


def test_cached_prefill_with_blockwise_attention_equals_the_reference():
    """Prefill of 150 tokens into a 192-slot cache (the slots past each position hidden; of the 2 x 2
    tiles, the first 128 queries' second key tile skipped): same hidden states and cache as the
    reference attention."""
    tokens = jax.random.randint(jax.random.key(2), (2, 150), 0, CFG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(150), (2, 150))
    prefill = nnx.jit(lambda m, t, p, c: m.forward_cached(t, p, c, form="expanded"))
    (h_ref, c_ref), (h_blk, c_blk) = (
        prefill(Transformer(CFG.replace(attn_impl=impl), rngs=nnx.Rngs(0)), tokens, positions,
                init_cache(CFG, 2, 192, jnp.float32)) for impl in ("reference", "blockwise"))
    assert_close(h_blk, h_ref, 1e-5, "prefill hidden")
    for a, b in zip(jax.tree.leaves(c_ref), jax.tree.leaves(c_blk)):
        assert_close(b, a, 1e-5, "prefill cache")


# ---- the seam and its config field ----------------------------------------------------------------
def test_every_seam_impl_is_a_valid_config_value_and_nothing_else():
    for impl in IMPLS:
        assert ModelConfig(attn_impl=impl).attn_impl == impl
    with pytest.raises(ConfigError, match="attn_impl='flash'"):
        ModelConfig(attn_impl="flash")
    q, k, v, mask = make_inputs(1, 4, 4, 2, 2, 8, 8)
    with pytest.raises(ConfigError, match="impl='flash'.*expected one of"):
        attention(q, k, v, mask, scale=1.0, impl="flash")


def test_shapes_and_tiles_are_checked_with_a_message_naming_them():
    q, k, v, mask = make_inputs(1, 4, 6, 2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"q \(1, 4, 2, 8\), k \(1, 6, 2, 8\).*mask \(1, 6, 4\)"):
        blockwise_attention(q, k, v, mask.swapaxes(1, 2), scale=1.0)
    with pytest.raises(ValueError, match="Hk = H or 1"):
        blockwise_attention(q, jnp.concatenate([k] * 2, 2), jnp.concatenate([v] * 2, 2), mask, scale=1.0)
    with pytest.raises(ValueError, match="FlashTuning.block_q=0"):
        FlashTuning(block_q=0)
    with pytest.raises(ValueError, match="block_kv=64 must be a multiple of 128"):
        splash_attention(q, k, v, mask, scale=1.0, tuning=FlashTuning(16, 64))


# ---- splash (TPU kernel; Pallas interpret mode here) -----------------------------------------------
SPLASH_CASES = [  # (id, B, S, T, H, Hk, Dk, Dv, positions, empty rows, block_q); block_kv 128
    ("v3-dims-padded", 2, 136, 136, 2, 2, 192, 128, "train", 3, 128),
    ("shared-kv-decode", 2, 3, 200, 4, 1, 40, 32, "random", 1, 128),
]


@pytest.mark.parametrize("case", SPLASH_CASES, ids=[c[0] for c in SPLASH_CASES])
def test_splash_equals_reference_in_values_and_gradients(case):
    """The same kernel a TPU compiles, run by Pallas's interpreter on CPU (interpret=None picks it)."""
    name, B, S, T, H, Hk, Dk, Dv, positions, empty, bq = case
    inputs = make_inputs(B, S, T, H, Hk, Dk, Dv, positions=positions, empty_rows=empty)
    fn = lambda *a, scale: splash_attention(*a, scale=scale, tuning=FlashTuning(bq, 128))  # noqa: E731
    check_against_reference(fn, inputs, V3_SCALE, 1e-5, f"splash {name}")


# ---- GPU kernels --------------------------------------------------------------------------------
HAS_TOKAMAX = importlib.util.find_spec("tokamax") is not None


def _needs_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip(reason=f"tokamax and cuDNN attention need jax.default_backend() == 'gpu' (got "
                    f"{jax.default_backend()!r}); blockwise and splash cover the same seam on CPU")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["tokamax", "cudnn"])
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c[0])
def test_gpu_kernel_equals_reference_in_values_and_gradients(impl, case):
    """bfloat16 (both kernels want it); V3's 192/128 dims, the shared key head, fully masked rows."""
    _needs_gpu()
    if impl == "tokamax" and not HAS_TOKAMAX:
        pytest.skip(reason="tokamax is not installed (the optional `gpu` extra)")
    name, B, S, T, H, Hk, Dk, Dv, positions, empty, _, _ = case
    inputs = make_inputs(B, S, T, H, Hk, Dk, Dv, positions=positions, empty_rows=empty, dtype=jnp.bfloat16)
    fn = lambda *a, scale: attention(*a, scale=scale, impl=impl)  # noqa: E731
    check_against_reference(fn, inputs, V3_SCALE, 2 ** -6, f"{impl} {name}")


@pytest.mark.skipif(HAS_TOKAMAX, reason="tokamax is installed: the missing-package error cannot happen")
def test_tokamax_without_the_package_is_a_config_error_naming_it():
    q, k, v, mask = make_inputs(1, 4, 4, 2, 2, 8, 8)
    with pytest.raises(ConfigError, match="attn_impl='tokamax' needs the tokamax package"):
        attention(q, k, v, mask, scale=1.0, impl="tokamax")
