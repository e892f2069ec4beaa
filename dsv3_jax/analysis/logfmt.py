"""LogFMT-nBit against FP8 for the MoE combine (ISCA '25 paper §3.2).

LogFMT-n (implemented in `dsv3_jax.parallel.wire`) keeps, per 1x128 tile, the min and max of
ln|x| and codes each element as a sign and one of 2^(n-1) - 1 equally spaced log levels (code
0 = exact zero), rounding in linear space so that the result is unbiased. The paper tried it on
~7B dense models by quantizing each residual-branch output, to mimic what the combine
all-to-all would carry: LogFMT-8 trained more accurately than E4M3 and E5M2, LogFMT-10 about as
well as a BF16 combine. It prints no error figure, so these rows are ours only.

Measured here on the tensor the combine sums: the output of the `small` preset's MoE layer
(random weights, the dense reference path) on unit-RMS Gaussian inputs, as its ffn_norm hands
it. The error of a round trip through each wire format is ||decode(encode(y)) - y|| / ||y||.
BF16, E4M3 (DeepSeek's dispatch format: power-of-two 1x128 scales) and LogFMT come from
`parallel/wire.py`; E5M2 is not a wire format there, so `e5m2_roundtrip` quantizes with the
same 1x128 power-of-two scaling. Random weights give near-Gaussian tiles, milder than a trained
model's outliers, so the rows show the formats' ordering, not the paper's training result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.analysis.report import Row
from dsv3_jax.config import preset
from dsv3_jax.moe import MoE
from dsv3_jax.parallel import wire
from pallas_kernels import TILE

E5M2_MAX = float(jnp.finfo(jnp.float8_e5m2).max)  # 57344


def e5m2_roundtrip(x: jax.Array) -> jax.Array:
    """x (..., K), K a multiple of 128 -> E5M2 with one power-of-two scale per 1x128 tile, decoded."""
    tiles = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, TILE)
    amax = jnp.max(jnp.abs(tiles), axis=-1, keepdims=True)
    scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / E5M2_MAX)))
    q = (tiles / scale).astype(jnp.float8_e5m2).astype(jnp.float32) * scale
    return q.reshape(x.shape).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def combine_activations(tokens: int = 256, seed: int = 0) -> jax.Array:
    """[tokens, dim] float32: one `small`-preset MoE layer's output on unit-RMS inputs (built
    and run in one jit: one compile instead of one per eager op)."""
    cfg = preset("small", moe_impl="dense", dtype="float32", param_dtype="float32")
    moe = MoE(cfg, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (1, tokens, cfg.dim), jnp.float32)
    y, _ = moe(x)
    return y[0]


def relative_error(y: jax.Array, fmt: str) -> float:
    """||roundtrip(y) - y|| / ||y|| for a wire format, or "e5m2".

    Runs eagerly on purpose: under jit XLA may drop an f32 -> bf16 -> f32 round trip as excess
    precision, and the BF16 error would read 0."""
    back = e5m2_roundtrip(y) if fmt == "e5m2" else wire.roundtrip(y, fmt)
    return float(jnp.linalg.norm(back - y) / jnp.linalg.norm(y))


FORMATS = {  # row key -> format name in wire.py (or "e5m2")
    "bf16": "bf16", "e4m3": "fp8", "e5m2": "e5m2", "logfmt8": "logfmt8", "logfmt10": "logfmt10",
}


def errors() -> dict[str, float]:
    y = combine_activations()
    return {key: relative_error(y, fmt) for key, fmt in FORMATS.items()}


def rows() -> list[Row]:
    src = "ours: small-preset MoE output, ||err||/||y||"
    return [Row(f"combine_rel_err_pct.{key}", None, 100 * err, "%", src) for key, err in errors().items()]
