"""Specification of the FP8 kernels (DeepSeek-V3 report §3.3).

Quantizers: 1x128 activation tiles, 128x128 weight blocks, 128x1 Wgrad tiles,
scale = max(amax, 1e-4) / 448, optional power-of-two (UE8M0) scales.
GEMM: out = x @ w.T in split-K form with FP32 promotion every 128 of K; every
implementation must equal the pure-jnp reference, which must equal float64
numpy on the dequantized operands.

Kernel tests follow "one body, two modes": ``_MosaicGpuCases`` holds the body;
``TestMosaicGpuCompiled`` runs it compiled on a real GPU (marked ``gpu``) and
``TestMosaicGpuInterpret`` runs the same body in Mosaic GPU interpret mode on CPU.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    Fp8GroupedTuning, Fp8MatmulTuning, dequantize_act_1x128, dequantize_act_128x1,
    dequantize_weight_128x128, fp8_block_matmul, fp8_block_matmul_reference,
    fp8_grouped_matmul, fp8_grouped_matmul_reference, fp8_linear, quantize_act_1x128,
    quantize_act_128x1, quantize_weight_128x128)
from pallas_kernels import fp8_matmul_mgpu

E4M3_REL_STEP = 2.0 ** -4   # 3 mantissa bits, round to nearest: |err| <= 2^-4 |x|
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # half of the smallest subnormal, 2^-9


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded by the test id (reproducible, distinct)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def assert_close(actual, expected, *, atol, rtol=0.0, what=""):
    """allclose with the max and mean error in the failure message."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {err.size} elements out of tolerance; max abs err "
        f"{err.max():.3e}, mean abs err {err.mean():.3e}, max |expected| "
        f"{np.abs(e).max():.3e}, atol {np.max(atol):.1e}, rtol {rtol:.1e}")


def quantized_operands(rng, lead, n, k, *, pow2=False, row_scales=False, outliers=True):
    """Random activations with per-row outliers and weights with a per-block spread."""
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    if outliers:  # token-correlated outliers: what fine-grained scaling is for
        x *= np.exp(rng.uniform(-3, 3, size=(*lead, 1))).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    xq, xs = quantize_act_1x128(jnp.asarray(x), pow2_scale=pow2)
    if row_scales:  # the Wgrad form: one scale per row of the weight operand
        wq, ws = quantize_act_1x128(jnp.asarray(w), pow2_scale=pow2)
    else:
        wq, ws = quantize_weight_128x128(jnp.asarray(w), pow2_scale=pow2)
    return xq, xs, wq, ws


def dequant_f64(xq, xs, wq, ws):
    x = np.asarray(dequantize_act_1x128(xq, xs), np.float64)
    n = wq.shape[0]
    if ws.shape[0] == n:
        w = np.asarray(dequantize_act_1x128(wq, ws), np.float64)
    else:
        w = np.asarray(dequantize_weight_128x128(wq, ws), np.float64)
    return x, w


# ---------------------------------------------------------------- quantizers

@pytest.mark.parametrize("shape", [(4, 256), (3, 5, 200), (2, 1), (1, 129)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_act_1x128_round_trip_within_e4m3_step(rng, shape, dtype):
    x = jnp.asarray(rng.standard_normal(shape) * 3.0, dtype)
    q, s = quantize_act_1x128(x)
    nk = -(-shape[-1] // 128)
    assert q.shape == shape and q.dtype == jnp.float8_e4m3fn
    assert s.shape == (*shape[:-1], nk) and s.dtype == jnp.float32
    xf = np.asarray(x, np.float64)
    s_full = np.repeat(np.asarray(s, np.float64), 128, axis=-1)[..., :shape[-1]]
    err = np.abs(np.asarray(dequantize_act_1x128(q, s), np.float64) - xf)
    bound = E4M3_REL_STEP * np.abs(xf) + E4M3_SUBNORMAL_HALF_STEP * s_full + 1e-12
    assert (err <= bound).all(), f"max err/bound {np.max(err / bound):.3f}"
    # Each tile's amax maps to 448, so the scale is amax/448 and |q| <= 448.
    xp = np.pad(np.abs(xf), [(0, 0)] * (len(shape) - 1) + [(0, nk * 128 - shape[-1])])
    amax = xp.reshape(*shape[:-1], nk, 128).max(-1)
    np.testing.assert_allclose(np.asarray(s), np.maximum(amax, 1e-4) / 448, rtol=1e-6)
    assert np.abs(np.asarray(q, np.float32)).max() <= 448
    rel = err.sum() / np.abs(xf).sum()
    assert rel < 0.04, f"mean relative error {rel:.4f}"


@pytest.mark.parametrize("quantize", [quantize_act_1x128, quantize_act_128x1,
                                      quantize_weight_128x128])
def test_pow2_scales_are_powers_of_two_rounded_up(rng, quantize):
    x = jnp.asarray(rng.standard_normal((260, 300)) * rng.uniform(0.01, 100.0), jnp.float32)
    q, s = quantize(x, pow2_scale=True)
    _, s_exact = quantize(x)
    s, s_exact = np.asarray(s, np.float64), np.asarray(s_exact, np.float64)
    mant, _ = np.frexp(s)
    assert (mant == 0.5).all(), "pow2 scales must be exact powers of two"
    assert (s >= s_exact).all() and (s < 2 * s_exact).all(), "UE8M0 rounds the scale up"
    assert np.isfinite(np.asarray(q, np.float32)).all()
    assert np.abs(np.asarray(q, np.float32)).max() <= 448


def test_edge_tiles_are_zero_padded_and_zero_tiles_get_the_floor_scale(rng):
    x = rng.standard_normal((3, 200)).astype(np.float32)
    x[1] = 0.0
    q, s = quantize_act_1x128(jnp.asarray(x))
    s = np.asarray(s)
    # The 72-wide edge tile's scale comes from its own values only (padding is zero).
    np.testing.assert_allclose(s[[0, 2], 1], np.abs(x[[0, 2], 128:]).max(-1) / 448, rtol=1e-6)
    np.testing.assert_allclose(s[1], [1e-4 / 448] * 2, rtol=1e-6)
    assert (np.asarray(q[1], np.float32) == 0).all()
    w = rng.standard_normal((130, 129)).astype(np.float32)
    wq, ws = quantize_weight_128x128(jnp.asarray(w))
    assert wq.shape == (130, 129) and ws.shape == (2, 2)
    np.testing.assert_allclose(np.asarray(ws)[1, 1], np.abs(w[128:, 128:]).max() / 448, rtol=1e-6)
    # The matmul wrapper zero-pads K: a K=129 GEMM equals the float64 product.
    xq, xs = quantize_act_1x128(jnp.asarray(rng.standard_normal((5, 129)), jnp.float32))
    xd, wd = dequant_f64(xq, xs, wq, ws)
    out = fp8_block_matmul(xq, xs, wq, ws, impl="pallas", interpret=True)
    assert_close(out, xd @ wd.T, atol=1e-5, rtol=1e-5, what="K=129 padded GEMM")


@pytest.mark.parametrize("shape", [(128, 256), (200, 300), (1, 7)])
def test_weight_128x128_round_trip_and_block_scales(rng, shape):
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    q, s = quantize_weight_128x128(jnp.asarray(w))
    nb, kb = -(-shape[0] // 128), -(-shape[1] // 128)
    assert q.shape == shape and s.shape == (nb, kb)
    wp = np.pad(np.abs(w), [(0, nb * 128 - shape[0]), (0, kb * 128 - shape[1])])
    amax = wp.reshape(nb, 128, kb, 128).max(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(s), np.maximum(amax, 1e-4) / 448, rtol=1e-6)
    s_full = np.repeat(np.repeat(np.asarray(s), 128, 0), 128, 1)[:shape[0], :shape[1]]
    err = np.abs(np.asarray(dequantize_weight_128x128(q, s), np.float64) - w)
    assert (err <= E4M3_REL_STEP * np.abs(w) + E4M3_SUBNORMAL_HALF_STEP * s_full + 1e-12).all()


def test_act_128x1_tiles_run_along_tokens(rng):
    x = jnp.asarray(rng.standard_normal((2, 300, 40)), jnp.float32)
    q, s = quantize_act_128x1(x)
    assert q.shape == (2, 300, 40) and s.shape == (2, 3, 40)
    qt, st = quantize_act_1x128(jnp.swapaxes(x, -1, -2))
    np.testing.assert_array_equal(np.asarray(s), np.swapaxes(np.asarray(st), -1, -2))
    np.testing.assert_array_equal(np.asarray(q, np.float32),
                                  np.swapaxes(np.asarray(qt, np.float32), -1, -2))
    err = np.abs(np.asarray(dequantize_act_128x1(q, s)) - np.asarray(x))
    assert err.max() <= E4M3_REL_STEP * np.abs(np.asarray(x)).max()


def test_validation_errors_name_the_bad_shape_or_dtype(rng):
    with pytest.raises(ValueError, match=r"int32.*expected|expected.*int32"):
        quantize_act_1x128(jnp.ones((4, 128), jnp.int32))
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        quantize_weight_128x128(jnp.ones((2, 3, 4)))
    xq, xs, wq, ws = quantized_operands(rng, (8,), 128, 256)
    with pytest.raises(ValueError, match=r"\(128, 256\).*\(8, 384\).*\(N, 384\)"):
        fp8_block_matmul_reference(jnp.zeros((8, 384), jnp.float8_e4m3fn), xs, wq, ws)
    with pytest.raises(ValueError, match=r"float8_e4m3fn.*xq float32\(8, 256\)"):
        fp8_block_matmul(xq.astype(jnp.float32), xs, wq, ws)
    with pytest.raises(ValueError, match=r"xs must be float32 of shape \(8, 2\).*\(8, 3\)"):
        fp8_block_matmul(xq, jnp.ones((8, 3)), wq, ws)
    with pytest.raises(ValueError, match=r"ws must be float32 of shape \(1, 2\).*\(2, 2\)"):
        fp8_block_matmul(xq, xs, wq, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"impl must be one of .*'cuda'"):
        fp8_block_matmul(xq, xs, wq, ws, impl="cuda")
    with pytest.raises(ValueError, match=r"block_m must be a positive int, got 0"):
        Fp8MatmulTuning(block_m=0)
    with pytest.raises(ValueError, match=r"block_m=96 must be a multiple of 64"):
        fp8_block_matmul(xq, xs, wq, ws, impl="mosaic_gpu",
                         tuning=Fp8MatmulTuning(block_m=96, mosaic_variant="simple"))
    with pytest.raises(ValueError, match=r"mosaic_variant must be .*got 'fast'"):
        Fp8MatmulTuning(mosaic_variant="fast")
    with pytest.raises(ValueError, match=r"group_sizes .* shape \(4,\).*\(3,\)"):
        fp8_grouped_matmul(xq, xs, jnp.stack([wq] * 4), jnp.stack([ws] * 4),
                           jnp.ones((3,), jnp.int32))


# ---------------------------------------------------------------- reference GEMM

@pytest.mark.parametrize("lead,n,k", [((64,), 128, 256), ((100,), 200, 300),
                                      ((2, 3), 130, 129), ((1,), 1, 1)])
@pytest.mark.parametrize("row_scales", [False, True])
def test_reference_equals_float64_on_dequantized_operands(rng, lead, n, k, row_scales):
    xq, xs, wq, ws = quantized_operands(rng, lead, n, k, row_scales=row_scales)
    out = fp8_block_matmul_reference(xq, xs, wq, ws)
    assert out.shape == (*lead, n) and out.dtype == jnp.float32
    x, w = dequant_f64(xq, xs, wq, ws)
    # f32 sums of exact products: error <= ~K * 2^-24 * sum|terms|.
    mag = np.abs(x) @ np.abs(w).T
    err = np.abs(np.asarray(out, np.float64) - x @ w.T)
    assert (err <= 2e-6 * mag + 1e-30).all(), (
        f"max err/|terms| {np.max(err / (mag + 1e-30)):.2e}, max err {err.max():.2e}, "
        f"mean err {err.mean():.2e}")
    if jax.default_backend() == "cpu":  # impl="auto" is the reference on CPU
        np.testing.assert_array_equal(fp8_block_matmul(xq, xs, wq, ws), out)


# ---------------------------------------------------------------- generic Pallas kernel

@pytest.mark.parametrize("variant", ["k_loop", "k_grid"])
@pytest.mark.parametrize("lead,n,k,bm,bn", [((128,), 256, 384, 64, 128),
                                            ((2, 50), 200, 300, 32, 64),
                                            ((5,), 130, 129, 128, 128)])
def test_pallas_kernel_interpret_equals_reference(rng, variant, lead, n, k, bm, bn):
    xq, xs, wq, ws = quantized_operands(rng, lead, n, k, row_scales=(bm == 32))
    tuning = Fp8MatmulTuning(block_m=bm, block_n=bn, pallas_variant=variant)
    ref = fp8_block_matmul_reference(xq, xs, wq, ws)
    out = fp8_block_matmul(xq, xs, wq, ws, impl="pallas", interpret=True, tuning=tuning)
    scale = float(np.abs(np.asarray(ref)).max())
    assert_close(out, ref, atol=2e-6 * scale, what=f"pallas {variant} {tuning}")
    out16 = fp8_block_matmul(xq, xs, wq, ws, jnp.bfloat16, impl="pallas", interpret=True,
                             tuning=tuning)
    assert out16.dtype == jnp.bfloat16
    assert_close(out16, ref, atol=1e-6 * scale, rtol=2 ** -8, what="bf16 output")


# ---------------------------------------------------------------- Mosaic GPU kernel

class _MosaicGpuCases:
    """Body shared by the compiled (GPU) and interpret (CPU) modes."""
    interpret_mode = False
    # (lead, N, K, tuning or None, weight scales per row?).  The default variant is the
    # warp-specialized persistent kernel ("ws"); M <= 64 splits its warpgroups along N.
    simple = functools.partial(Fp8MatmulTuning, block_m=64, mosaic_variant="simple")
    cases = [((128,), 128, 256, None, False),
             ((100,), 200, 300, Fp8MatmulTuning(block_n=64), False),
             ((2, 3), 192, 256, Fp8MatmulTuning(block_n=192), False),
             ((70,), 96, 384, Fp8MatmulTuning(block_n=32), True),
             ((300,), 256, 512, Fp8MatmulTuning(max_concurrent_steps=3), False),
             ((100,), 200, 300, simple(block_n=64), False),
             ((2, 3), 192, 256, simple(block_n=192), False),
             ((70,), 96, 384, simple(block_n=32), True)]

    def tolerance(self, xq, xs, wq, ws, ref):
        """Interpret mode sums in exact FP32.  Real Hopper FP8 wgmma keeps only ~13 fraction
        bits of its running sum within each 128-wide K block (V3 report §3.3.2: the reason
        for promoting to FP32 every 128), so compiled, the bound is 2^-11 of the sum of
        |products| per output; a wrong scale or index errs by about |y| itself, far above."""
        scale = float(np.abs(np.asarray(ref)).max())
        if self.interpret_mode:
            return 2e-6 * scale
        x, w = dequant_f64(xq, xs, wq, ws)
        return 2.0 ** -11 * (np.abs(x) @ np.abs(w).T) + 1e-6 * scale

    def interpret(self, detect_races=False):
        if not self.interpret_mode:
            return None
        return fp8_matmul_mgpu.default_interpret_params(detect_races=detect_races)

    @pytest.mark.parametrize("case", range(8))
    def test_equals_reference(self, rng, case):
        lead, n, k, tuning, row_scales = self.cases[case]
        xq, xs, wq, ws = quantized_operands(rng, lead, n, k, row_scales=row_scales)
        ref = fp8_block_matmul_reference(xq, xs, wq, ws)
        out = fp8_block_matmul(xq, xs, wq, ws, impl="mosaic_gpu",
                               interpret=self.interpret(), tuning=tuning)
        assert out.shape == ref.shape
        assert_close(out, ref, atol=self.tolerance(xq, xs, wq, ws, ref),
                     what=f"mosaic_gpu case {case}")

    @pytest.mark.parametrize("variant,m", [("ws", 64), ("ws", 256), ("simple", 64)])
    def test_bf16_output_and_pow2_scales_without_races(self, rng, variant, m):
        # detect_races only means something in interpret mode (a race raises there); on GPU
        # it is a plain run.
        xq, xs, wq, ws = quantized_operands(rng, (m,), 64, 384, pow2=True)
        ref = fp8_block_matmul_reference(xq, xs, wq, ws)
        out = fp8_block_matmul(xq, xs, wq, ws, jnp.bfloat16, impl="mosaic_gpu",
                               interpret=self.interpret(detect_races=True),
                               tuning=Fp8MatmulTuning(block_m=64, block_n=64,
                                                      max_concurrent_steps=2,
                                                      mosaic_variant=variant))
        assert out.dtype == jnp.bfloat16
        assert_close(out, ref, atol=self.tolerance(xq, xs, wq, ws, ref), rtol=2 ** -8,
                     what="mosaic bf16 out")


@pytest.mark.gpu
class TestMosaicGpuCompiled(_MosaicGpuCases):
    interpret_mode = False

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if jax.default_backend() != "gpu":
            pytest.skip(reason="compiled Mosaic GPU kernels need jax.default_backend() == 'gpu' "
                        f"(got {jax.default_backend()!r}); TestMosaicGpuInterpret runs "
                        "the same body in GPU interpret mode")
        if not fp8_matmul_mgpu.HAS_MGPU:
            pytest.skip(reason="jax.experimental.pallas.mosaic_gpu is not importable")


class TestMosaicGpuInterpret(_MosaicGpuCases):
    interpret_mode = True

    @pytest.fixture(autouse=True)
    def _needs_mgpu(self):
        if not fp8_matmul_mgpu.HAS_MGPU:
            pytest.skip(reason="jax.experimental.pallas.mosaic_gpu is not importable")
        yield
        # The simulator must be reset after an exception inside it (see the
        # InterpretGPUParams docstring), or later tests inherit its state.  The
        # reset function has no public name in jax 0.11/0.12.
        try:
            from jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks import (
                reset_gpu_interpret_mode_state)
        except ImportError:
            return
        reset_gpu_interpret_mode_state()


# ---------------------------------------------------------------- grouped (MoE)

@pytest.mark.parametrize("group_sizes,m", [([0, 70, 5, 100], 190), ([64, 64], 128),
                                           ([3, 0, 0, 1, 9], 13)])
def test_grouped_equals_per_expert_loop(rng, group_sizes, m):
    e, n, k = len(group_sizes), 200, 300
    xq, xs, _, _ = quantized_operands(rng, (m,), n, k)
    w = jnp.asarray(rng.standard_normal((e, n, k)) * 0.05, jnp.float32)
    wq, ws = jax.vmap(quantize_weight_128x128)(w)
    gs = jnp.asarray(group_sizes, jnp.int32)
    expected = np.zeros((m, n))
    start = 0
    for g_e, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        if size:
            x, wd = dequant_f64(xq[rows], xs[rows], wq[g_e], ws[g_e])
            expected[rows] = x @ wd.T
        start += size
    ref = fp8_grouped_matmul_reference(xq, xs, wq, ws, gs)
    scale = np.abs(expected).max()
    assert_close(ref, expected, atol=2e-6 * scale, what="grouped reference vs loop")
    assert (np.asarray(ref)[sum(group_sizes):] == 0).all(), "rows past the groups are zero"
    out = fp8_grouped_matmul(xq, xs, wq, ws, gs, impl="pallas", interpret=True,
                             tuning=Fp8GroupedTuning(block_m=32, block_n=128))
    assert_close(out, ref, atol=2e-6 * scale, what="grouped pallas vs reference")


# ---------------------------------------------------------------- differentiable layer

@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_fp8_linear_value_and_grads_track_full_precision(rng, impl):
    x = jnp.asarray(rng.standard_normal((2, 100, 300)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((200, 300)) * 0.05, jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    y, grads = jax.value_and_grad(loss(lambda x, w: fp8_linear(x, w, impl)), (0, 1))(x, w)
    y_ref, grads_ref = jax.value_and_grad(loss(lambda x, w: x @ w.T), (0, 1))(x, w)
    fwd = fp8_linear(x, w, impl)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    # Two e4m3 roundings (~2-3% RMS each) per product, averaged over the sum.
    assert rel(fwd, x @ w.T) < 0.05, rel(fwd, x @ w.T)
    for name, g, g_ref in zip(("dx", "dw"), grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
        assert rel(g, g_ref) < 0.07, f"{name}: relative error {rel(g, g_ref):.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(160, 512), (768, 256), (512, 2048), (256, 512)])
def test_fp8_linear_compiled_kernel_equals_reference(rng, n, k):
    """Fprop, Dgrad and Wgrad through the compiled Mosaic kernel equal the jnp reference at the
    small preset's layer shapes (4096 tokens), within the wgmma accumulator's precision; a wrong
    layout or scale would be off by O(1)."""
    if jax.default_backend() != "gpu":
        pytest.skip(reason=f"needs the compiled Mosaic GPU kernel (backend {jax.default_backend()!r})")
    x = jnp.asarray(rng.standard_normal((4096, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((4096, n)), jnp.float32)
    got = {}
    for impl in ("mosaic_gpu", "reference"):
        y, vjp = jax.vjp(lambda x, w, impl=impl: fp8_linear(x, w, impl), x, w)
        got[impl] = (y, *vjp(dy))
    for name, a, b in zip(("y", "dx", "dw"), got["mosaic_gpu"], got["reference"]):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert rel < 1e-3, f"{name}: relative difference {rel:.2e} (n={n}, k={k})"
