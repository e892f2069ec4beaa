"""`dsv3-infer --dry_run`: will a checkpoint serve on this mesh? Compile, allocate nothing.

From config.json alone (no tensor read): abstract weights in the checkpoint's dtypes (e4m3 + f32
block scales with `keep_fp8`) laid out by the logical-axis rules, the decode batch's latent cache,
and the two compiled programs of the engine (`programs.py`): prefill of `prefill_batch` prompts of
`max_len` tokens and the decode step of `batch` sequences over `max_len` cache slots. Per device:
weights and cache from their shardings, XLA's temporaries from each program's memory analysis,
and a total that assumes the two programs do not run at once (the engine alternates them):

    total = weights + decode state (cache, tokens, ...) + max(decode temporaries,
                                                          prefill temporaries + prefill output)

One CPU artefact is measured and shown apart: XLA:CPU has no FP8 arithmetic, so it converts every
e4m3 weight to an F16 copy in the entry computation, ahead of the layer loop (2 bytes for each
stored byte). A GPU compile reads e4m3 in its kernels and makes no such copy. The report finds
those converts in the compiled HLO and prints the total with and without them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dsv3_jax.cache import bytes_per_token
from dsv3_jax.config import ModelConfig
from dsv3_jax.infer import programs
from dsv3_jax.infer.sampling import SamplingConfig
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import abstract_with, batch_sharding, per_device_bytes, state_shardings

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class DryRun:
    batch: int  # decode sequences
    max_len: int  # cache slots per sequence
    prefill_batch: int = 1  # prompts per prefill call
    n_draft: int = 0  # MTP drafts per step
    cache_dtype: str = "bfloat16"


def _lower(program, *args, **kw):
    t0 = time.perf_counter()
    compiled = program.lower(*args, **kw).compile()
    return compiled, time.perf_counter() - t0


_HLO_VALUE = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w+)\(([^)]*)\)")


def cpu_fp8_upcast_bytes(hlo_text: str) -> int:
    """Bytes of the F16 copies XLA:CPU makes of FP8 entry parameters (see the module docstring):
    instructions of the entry computation whose result is f16 and whose operand is an e4m3
    parameter."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    fp8_params, total = set(), 0
    for m in map(_HLO_VALUE.match, entry.splitlines()):
        if not m:
            continue
        name, dtype, dims, op, operands = m.groups()
        if op == "parameter" and dtype.startswith("f8"):
            fp8_params.add(name)
        elif dtype == "f16" and any(o.strip().lstrip("%") in fp8_params for o in operands.split(",")):
            total += 2 * math.prod(int(d) for d in dims.split(",") if d)
    return total


def report(cfg: ModelConfig, mesh: Mesh, run: DryRun) -> dict:
    """Compile prefill and the decode step for `cfg` on `mesh`; -> per-device bytes and timings."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    leaves, treedef = jax.tree.flatten(abstract_with(params, state_shardings(params, mesh)))
    model_def, params = programs.ModelDef(graphdef, treedef), leaves
    dt = jnp.dtype(run.cache_dtype)
    state = jax.eval_shape(lambda: programs.empty_state(cfg, run.batch, run.max_len, n_draft=run.n_draft,
                                                       cache_dtype=dt, hidden_dtype=jnp.dtype(cfg.dtype)))
    state = abstract_with(state, programs.state_shardings_for(state, mesh))
    B, S = run.prefill_batch, run.max_len
    rows = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, shape))  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    static = dict(n_draft=run.n_draft, mesh=mesh)
    with jax.set_mesh(mesh):  # moe_impl="ep" opens its shard_map over the ambient mesh
        decode, decode_s = _lower(programs.step, model_def, params, state, key, jnp.int32(0),
                                  sampling=SamplingConfig().rows(run.batch), **static)
        prefill, prefill_s = _lower(programs.prefill, model_def, params, rows(B, S), rows(B), rows(B), rows(B), key,
                                    jnp.int32(0), sampling=SamplingConfig().rows(B), cache_dtype=dt, **static)
    d, p = decode.memory_analysis(), prefill.memory_analysis()
    upcast = {"decode": cpu_fp8_upcast_bytes(decode.as_text()), "prefill": cpu_fp8_upcast_bytes(prefill.as_text())}
    out = {
        "mesh": dict(mesh.shape), "batch": run.batch, "max_len": run.max_len, "prefill_batch": B,
        "weights": per_device_bytes(params), "cache": per_device_bytes(state.cache),
        "decode_state": per_device_bytes(state), "decode_temp": d.temp_size_in_bytes,
        "prefill_temp": p.temp_size_in_bytes, "prefill_output": p.output_size_in_bytes,
        "cache_bytes_per_token": bytes_per_token(state.cache), "compile_s": decode_s + prefill_s,
    }
    out["cpu_fp8_upcast"] = upcast
    out["total"] = out["weights"] + out["decode_state"] + max(out["decode_temp"],
                                                              out["prefill_temp"] + out["prefill_output"])
    out["total_without_cpu_upcast"] = out["weights"] + out["decode_state"] + max(
        out["decode_temp"] - upcast["decode"], out["prefill_temp"] - upcast["prefill"] + out["prefill_output"])
    return out


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    return "\n".join([
        f"dry run: mesh {mesh}, decode batch {r['batch']} x {r['max_len']} slots, prefill "
        f"{r['prefill_batch']} x {r['max_len']} tokens (compiled in {r['compile_s']:.0f} s)",
        "per device:",
        f"  weights                  {g(r['weights'])}",
        f"  latent cache             {g(r['cache'])}  ({r['cache_bytes_per_token']:,} bytes per token)",
        f"  decode state (incl cache){g(r['decode_state'])}",
        f"  decode temporaries       {g(r['decode_temp'])}  (of which XLA:CPU's F16 copies of FP8 weights "
        f"{g(r['cpu_fp8_upcast']['decode']).strip()})",
        f"  prefill temporaries      {g(r['prefill_temp'])}  (+ its output {g(r['prefill_output']).strip()}; "
        f"XLA:CPU's F16 copies of FP8 weights {g(r['cpu_fp8_upcast']['prefill']).strip()})",
        f"per-device total as compiled for this CPU: {r['total'] / GiB:.2f} GiB",
        f"per-device total: {r['total_without_cpu_upcast'] / GiB:.2f} GiB  (without XLA:CPU's FP8 upcast copies, "
        "which a GPU compile does not make)",
    ])
