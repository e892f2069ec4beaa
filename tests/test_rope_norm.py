"""RMSNorm, the projection matmul, RoPE and YaRN against direct numpy transcriptions of their formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig, preset
from dsv3_jax.layers import RMSNorm, matmul_nt
from dsv3_jax.rope import apply_rope, inv_frequencies, rope_tables, yarn_correction_range


def test_rmsnorm_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32) * 3
    w = rng.normal(size=16).astype(np.float32)
    norm = RMSNorm(16, "embed", eps=1e-6, param_dtype="float32")
    norm.weight[...] = jnp.asarray(w)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (4,), (1, 2), (2, 3)])
def test_matmul_nt_is_x_times_w_transposed_with_one_row_products_for_few_rows_on_cpu(lead):
    """A few rows go through one matrix-vector product each on XLA:CPU (its GEMM costs 2-3x the
    matrix-vector product at 2 rows); every form gives x @ w.T."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(*lead, 48)).astype(np.float32), rng.normal(size=(40, 48)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(matmul_nt(jnp.asarray(x), jnp.asarray(w))), want, rtol=1e-5, atol=1e-5)
    got = matmul_nt(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), out_dtype=jnp.float32)
    assert got.dtype == jnp.float32 and got.shape == (*lead, 40)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0.05, atol=0.3)
    rows = math.prod(lead)
    dots = str(jax.make_jaxpr(lambda a, b: matmul_nt(a, b))(jnp.asarray(x), jnp.asarray(w))).count("dot_general")
    assert dots == (rows if rows in (2, 3) else 1)


def test_rope_rotates_interleaved_pairs_as_complex_numbers():
    cfg = ModelConfig(qk_rope_head_dim=8, rope_theta=10000.0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)  # [B,S,H,R]
    pos = np.stack([np.arange(6), np.arange(6) + 100])
    cos, sin = rope_tables(cfg, jnp.asarray(pos))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    theta = 10000.0 ** (-np.arange(0, 8, 2) / 8)  # [R/2]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * pos[:, :, None, None] * theta)
    want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rope_preserves_norm_and_relative_position():
    cfg = ModelConfig(qk_rope_head_dim=8)
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(2, 1, 1, 1, 8)).astype(np.float32)

    def rot(v, p):
        cos, sin = rope_tables(cfg, jnp.asarray([[p]]))
        return np.asarray(apply_rope(jnp.asarray(v), cos, sin)).ravel()

    assert np.isclose(np.linalg.norm(rot(q, 37)), np.linalg.norm(q), rtol=1e-5)
    # <R(m) q, R(n) k> depends on m - n only
    assert np.isclose(rot(q, 10) @ rot(k, 3), rot(q, 57) @ rot(k, 50), rtol=1e-4)


def _yarn_inv_freq_numpy(dim, base, factor, orig, beta_fast, beta_slow):
    """YaRN (Peng et al. 2023) as DeepSeek's reference writes it, transcribed independently."""
    freqs = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    corr = lambda rot: dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    smooth = 1 - np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    return freqs / factor * (1 - smooth) + freqs * smooth


@pytest.mark.parametrize("factor,orig", [(40.0, 4096), (4.0, 8), (8.0, 64)])
def test_yarn_frequencies_match_formula(factor, orig):
    cfg = ModelConfig(qk_rope_head_dim=64, rope_factor=factor, original_seq_len=orig)
    want = _yarn_inv_freq_numpy(64, 10000.0, factor, orig, 32.0, 1.0)
    np.testing.assert_allclose(inv_frequencies(cfg), want, rtol=1e-12)


def test_yarn_figures_of_deepseek_v3():
    """Facts file §2.2: correction range [10, 23]; mscale 1.36889; softmax scale 0.135234."""
    cfg = preset("v3_671b")
    assert yarn_correction_range(cfg) == (10, 23)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    freqs = inv_frequencies(cfg)
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(freqs[:10], base[:10])  # high frequencies: extrapolated, unchanged
    np.testing.assert_allclose(freqs[23:], base[23:] / 40)  # low frequencies: interpolated by s


def test_yarn_off_gives_plain_rope():
    cfg = ModelConfig(qk_rope_head_dim=16)
    np.testing.assert_allclose(inv_frequencies(cfg), 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16))
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5)
