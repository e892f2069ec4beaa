"""Two-micro-batch overlap (V3 report §3.2.1-§3.2.2, ISCA '25 §2.3.1): hide the EP all-to-all.

Each step's local batch is split into two micro-batches, A (even rows) and B (odd rows), and every
layer runs both: A's attention, A's MoE (route, dispatch, experts, combine), then B's. Nothing in
B's chain reads A's values and vice versa, so while A's dispatch or combine is on the network, B's
attention and expert GEMMs are free to run; XLA's latency-hiding scheduler (GPU flags below) makes
the collectives asynchronous and places independent compute between their start and done. DeepSeek
does the same by hand with SM partitioning; here the data dependencies are the whole mechanism, and
`tests/test_overlap.py` checks them in the compiled HLO (on CPU there is no async schedule to
inspect, so it asserts that A's all-to-all neither depends on nor feeds B's attention dots).

Splitting rows as reshape [B,S] -> [B/2, 2, S] keeps both halves sharded like the batch, with no
communication. The outputs are interleaved back, so `overlapped_forward` returns exactly
`Transformer.forward`'s ModelOutput.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.attention import causal_mask
from dsv3_jax.model import ModelOutput, check_tokens
from dsv3_jax.mtp import shift_tokens
from dsv3_jax.rope import rope_tables

# Exist in jaxlib 0.11/0.12 (jax_kernels.md §7.1); an unknown XLA flag aborts backend start-up.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
)
MICRO = ("mb0", "mb1")  # named scopes: the HLO test finds each micro-batch's ops by them


def gpu_requested() -> bool:
    """Will JAX start on a GPU? Decided without starting a backend (XLA_FLAGS must be set first)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return any(p in platforms for p in ("cuda", "gpu", "rocm"))
    return any(importlib.util.find_spec(m) is not None
               for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))


def set_gpu_xla_flags() -> list[str]:
    """Append the latency-hiding-scheduler flags to XLA_FLAGS (call before the backend starts);
    flags the user already set win. -> the flags added."""
    current = os.environ.get("XLA_FLAGS", "")
    added = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def split_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, ...] -> even rows [B/2, ...], odd rows [B/2, ...] (no data movement under the batch sharding)."""
    pairs = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def join_pair(a: jax.Array, b: jax.Array, axis: int = 0) -> jax.Array:
    """Inverse of split_pair along `axis`."""
    stacked = jnp.stack([a, b], axis=axis + 1)
    shape = list(a.shape)
    shape[axis] *= 2
    return stacked.reshape(shape)


def paired_stack(stack, hs, ropes):
    """Run a BlockStack's scanned layers on both micro-batches in one scan body."""
    graphdef, state = nnx.split(stack.blocks)

    def body(carry, layer_state):
        block = nnx.merge(graphdef, layer_state)
        outs, stats = [], []
        for name, h, rope in zip(MICRO, carry, ropes):
            with jax.named_scope(name):
                y, st = block(h, *rope)
            outs.append(y)
            stats.append(st)
        return tuple(outs), tuple(stats)

    from dsv3_jax.block import REMAT  # the stack's own remat policy, as BlockStack.__call__
    if REMAT[stack.remat] is not None:
        body = jax.checkpoint(body, policy=REMAT[stack.remat])
    return jax.lax.scan(body, tuple(hs), state)


def overlapped_forward(model, tokens: jax.Array, *, with_mtp: bool = True) -> ModelOutput:
    """Transformer.forward(tokens) computed as two interleaved micro-batches. tokens [B,S], B even."""
    check_tokens(tokens, model.cfg.vocab_size)
    if tokens.shape[0] % 2:
        raise ValueError(f"overlapped_forward: batch {tokens.shape[0]} must be even (two micro-batches)")
    toks = split_pair(tokens)
    S = tokens.shape[1]
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), toks[0].shape)
    rope = (*rope_tables(model.cfg, pos), causal_mask(pos, pos))
    ropes = (rope, rope)
    hs = []
    for name, t in zip(MICRO, toks):
        with jax.named_scope(name):
            hs.append(model.embed(t))
    if model.dense_layers is not None:
        hs, _ = paired_stack(model.dense_layers, hs, ropes)
    stats = ({}, {})
    if model.moe_layers is not None:
        hs, stats = paired_stack(model.moe_layers, hs, ropes)
    logits = join_pair(*[model.project(h, model.norm) for h in hs])
    loads = [stats[0]["load"] + stats[1]["load"]] if stats[0] else []
    balances = [(stats[0]["balance"] + stats[1]["balance"]) / 2] if stats[0] else []
    mtp_logits = None
    if with_mtp and len(model.mtp):
        outs = []
        hs = [model.norm(h) for h in hs]
        for k, module in enumerate(model.mtp, start=1):
            pair = []
            for i, (name, t) in enumerate(zip(MICRO, toks)):
                with jax.named_scope(name):
                    hs[i], st = module(hs[i], model.embed(shift_tokens(t, k)), *rope)
                pair.append((model.project(hs[i], module.norm), st))
            outs.append(join_pair(pair[0][0], pair[1][0]))
            if pair[0][1]:
                loads.append((pair[0][1]["load"] + pair[1][1]["load"])[None])
                balances.append(((pair[0][1]["balance"] + pair[1][1]["balance"]) / 2)[None])
        mtp_logits = jnp.stack(outs)
    return ModelOutput(logits=logits, mtp_logits=mtp_logits,
                       moe_load=jnp.concatenate(loads) if loads else None,
                       moe_balance=jnp.concatenate(balances) if balances else None)
