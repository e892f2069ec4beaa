"""FP8 in the model (V3 report §3.3): the linear layers and the experts' GEMMs in FP8 with FP8
Dgrad/Wgrad; embedding, head, gate, norms and attention core untouched. Compared with the
high-precision model on the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import Transformer, preset
from dsv3_jax.train.state import split_model
from dsv3_jax.train.step import loss_fn
from pallas_kernels import fp8_grouped_linear

CFG = preset("tiny", vocab_size=256)


def _loss_and_grads(cfg, tokens):
    g, p, b = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, b, g, tokens[:, :-1], tokens[:, 1:], 0.3, 1e-4)[0]))
    return f(p)


def test_fp8_model_matches_high_precision_loss_and_gradients():
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, 256)
    (l32, g32), (l8, g8) = _loss_and_grads(CFG, tokens), _loss_and_grads(CFG.replace(fp8=True), tokens)
    assert abs(float(l8) - float(l32)) / float(l32) < 1e-3
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g8)])
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    print(f"loss {l32:.6f} vs fp8 {l8:.6f}; gradient cosine {cos:.4f}")
    assert cos > 0.98 and not np.array_equal(a, b)


def test_fp8_flag_puts_e4m3_gemms_in_the_program_and_keeps_the_head_high_precision():
    m = Transformer(CFG.replace(fp8=True), rngs=nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda t: m(t))(jnp.zeros((1, 8), jnp.int32)))
    assert "f8_e4m3fn" in jaxpr
    plain = str(jax.make_jaxpr(lambda t: Transformer(CFG, rngs=nnx.Rngs(0))(t))(jnp.zeros((1, 8), jnp.int32)))
    assert "f8_e4m3fn" not in plain


def test_fp8_kernel_names_the_gemm_backend():
    """fp8_kernel picks the block-scaled GEMM; on CPU "auto" is the reference, and "pallas"
    (interpret mode) computes the same loss through a different program."""
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, 256)
    cfg = CFG.replace(fp8=True)
    assert cfg.linear_impl == "fp8" and cfg.replace(fp8_kernel="pallas").linear_impl == "fp8:pallas"
    losses = {k: float(_loss_and_grads(cfg.replace(fp8_kernel=k), tokens)[0])
              for k in ("auto", "reference", "pallas")}
    assert losses["auto"] == losses["reference"]
    assert abs(losses["pallas"] - losses["reference"]) < 1e-5 * abs(losses["reference"]), losses
    with pytest.raises(ValueError, match="fp8_kernel.*'triton'.*expected 'auto'"):
        CFG.replace(fp8_kernel="triton")


@pytest.mark.parametrize("sizes", [[5, 0, 40, 19], [64, 64, 0, 0]])
def test_fp8_grouped_linear_values_and_gradients(sizes):
    rng = np.random.default_rng(sum(sizes))
    M, K, N = sum(sizes), 96, 80
    x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(4, N, K)).astype(np.float32) / np.sqrt(K))
    gs = jnp.asarray(sizes, jnp.int32)
    ref = lambda x, w: jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), gs)  # noqa: E731
    y, y8 = ref(x, w), fp8_grouped_linear(x, w, gs)
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(y8, y) < 0.06
    dy = jnp.asarray(rng.normal(size=(M, N)).astype(np.float32))
    gx, gw = jax.vjp(ref, x, w)[1](dy)
    gx8, gw8 = jax.vjp(fp8_grouped_linear, x, w, gs)[1](dy)[:2]
    print(f"rel err: y {rel(y8, y):.3e} dx {rel(gx8, gx):.3e} dw {rel(gw8, gw):.3e}")
    assert rel(gx8, gx) < 0.06 and rel(gw8, gw) < 0.06
