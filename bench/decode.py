"""Decode throughput and KV-cache bytes per token: ours (absorbed MLA over the latent cache, with and
without MTP speculation) against HF transformers' `generate`, on the same saved checkpoint.

Model: BENCH below, a small DeepSeek-V3-shaped MoE (4 layers, 1 dense; dim 256; 8 heads; 16
routed experts, 4 active, 1 shared; kv_lora_rank 64, rope dim 16; vocab 4096; one MTP module;
10.5M parameters), float32 weights and compute on both sides, our cache in bfloat16. Our MoE
runs with moe_impl="tiled" (at batch 1 a loop over the 4 token copies reading only the activated
experts, `experts.copy_loop_experts`; the fast form on XLA:CPU where ragged_dot is slow); the
engine runs the layers unstacked (`Engine(unstack=)`). HF runs its default experts path with one
torch thread (two threads on a shared 2-core machine oversubscribe and run up to 30x slower).

The weights are random except for three choices that make MTP drafts often right, so that the
speculation columns mean something (a random model would accept ~1/vocab of its drafts):
unit-scale embeddings, an output head whose row perm[t] is token t's embedding (the model mostly
continues t with perm[t], plus what the blocks add), and an MTP `eh_proj` that passes the
embedding half through. `--init_std` (the blocks' weight scale) sets how often the blocks change
the continuation, i.e. the acceptance rate.

For each batch size B and context (prompt length) it runs warm greedy generation of `--new_tokens`
tokens `--repeats` times and reports decode tokens/s = B x tokens per step / the median time
between step results, pooled over the runs (the median shrugs off bursts of load on a shared
machine; the first token comes from prefill and is not counted). HF runs in .venv-hf through
tools/hf_decode_bench.py, timed the same way by a streamer inside `generate`; `--no_hf` skips
it. The first 8 greedy tokens of row 0 are compared as a check that both sides run the same
model. The last lines give the mean rates (total decode time) of the fastest run as well.

    python bench/decode.py                      # B in {1, 8} x context in {128, 2048}, ~3.5 min on 2 cores
    python bench/decode.py --batch 1 --context 128 --new_tokens 16 --no_hf   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.hf import from_pretrained, save_pretrained  # noqa: E402
from dsv3_jax.infer import Engine, bytes_per_token, init_cache  # noqa: E402
from dsv3_jax.model import Transformer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_PYTHON = os.path.join(REPO, ".venv-hf", "bin", "python")

BENCH = ModelConfig(
    vocab_size=4096, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=8,
    n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    max_seq_len=4096, n_mtp_modules=1)
# The same shape 4x wider (143M parameters, ~0.2 GB of float32 weights read per batch-1 step): its
# weights do not fit this CPU's 32 MB L3 as BENCH's activated ones do, so a decode step streams
# them from memory, as serving a real model does, and two rows read the bytes one row reads.
LARGE = BENCH.replace(dim=1024, inter_dim=3072, moe_inter_dim=512, n_heads=16, q_lora_rank=512, kv_lora_rank=256,
                      qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
MODELS = {"bench": BENCH, "large": LARGE}


def default_init_std(cfg: ModelConfig) -> float:
    """The blocks' weight scale: 0.08 at BENCH's width (~0.88 acceptance), scaled as 1/sqrt(dim)."""
    return 0.08 * (BENCH.dim / cfg.dim) ** 0.5


# ---- the checkpoint ------------------------------------------------------------------------------
def bench_model(cfg: ModelConfig, init_std: float, seed: int = 0) -> Transformer:
    """Random weights (numpy, into eval_shape's structure) with the drafting-friendly choices above."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        if len(path) > 1 and "norm" in str(path[-2]):
            value = np.ones(shape)
        elif path[-1] == "bias":
            value = np.zeros(shape)
        else:
            value = init_std * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    model = nnx.merge(graphdef, state)
    D, V = cfg.dim, cfg.vocab_size
    emb = rng.standard_normal((V, D))
    head = np.zeros((V, D))
    head[rng.permutation(V)] = emb
    model.embed.weight[...] = jnp.asarray(emb, model.embed.weight.dtype)
    model.head[...] = jnp.asarray(head, model.head.dtype)
    pass_embedding = np.concatenate([np.eye(D), np.zeros((D, D))], axis=1)
    for m in model.mtp:
        m.eh_proj.weight[...] = jnp.asarray(pass_embedding, m.eh_proj.weight.dtype)
    return model


# ---- one measurement ------------------------------------------------------------------------------
def ours(engine: Engine, prompts: np.ndarray, new_tokens: int, speculative: int, repeats: int) -> dict:
    B, S = prompts.shape
    max_len = -(-(S + new_tokens + speculative) // 64) * 64
    kw = dict(speculative=speculative, max_len=max_len, batch_size=B)
    # Compile the decode step (its shapes depend on B and the cache length only) on short prompts;
    # the first timed run then compiles only the prefill, which is not part of the decode time.
    engine.generate(prompts[:, :4].tolist(), max_new_tokens=3, **kw)
    runs = [engine.generate(prompts.tolist(), max_new_tokens=new_tokens, **kw) for _ in range(repeats)]
    s = runs[0].stats
    median_step = float(np.median(np.concatenate([r.stats.step_s for r in runs])))
    return {"tok_s": B * s.tokens_per_step / median_step,
            "mean_tok_s": max(r.stats.decode_tokens_per_s for r in runs),
            "acceptance": s.acceptance_rate, "tokens_per_step": s.tokens_per_step,
            "first_tokens": runs[0].tokens[0][:8]}


def hf(ckpt: str, prompts: np.ndarray, new_tokens: int, threads: int, repeats: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
        np.save(f, prompts)
    try:
        res = subprocess.run([HF_PYTHON, os.path.join(REPO, "tools", "hf_decode_bench.py"), "--model", ckpt,
                              "--input_ids", f.name, "--new_tokens", str(new_tokens), "--threads", str(threads),
                              "--repeats", str(repeats)],
                             capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"HF benchmark failed:\n{e.stderr[-3000:]}")
    finally:
        os.unlink(f.name)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {"tok_s": out["median_tokens_per_s"], "mean_tok_s": out["decode_tokens_per_s"],
            "bytes": out["cache_bytes_per_token"],
            "dtype": out["cache_dtype"], "first_tokens": out["first_tokens"]}


# ---- main ------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--model", choices=sorted(MODELS), default="bench",
                   help="bench: 10.5M parameters; large: 4x wider, weights streamed from memory")
    p.add_argument("--init_std", type=float,
                   help="blocks' weight scale; default 0.08 x sqrt(256 / dim): ~0.88 acceptance (V3 reports 0.85-0.9)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the fastest counts")
    p.add_argument("--moe_impl", choices=["ragged", "tiled", "dense"], default="tiled",
                   help="tiled: the fast form on XLA:CPU (decode: a loop over the token copies)")
    p.add_argument("--stacked", action="store_true", help="decode with the scanned layer stack (Engine(unstack=False))")
    p.add_argument("--cache_dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--no_hf", action="store_true")
    p.add_argument("--hf_threads", type=int, default=1,
                   help="torch threads; more than 1 on a shared 2-core machine oversubscribes (30x slower)")
    p.add_argument("--checkpoint", help="where to save the checkpoint (default: a temporary directory)")
    args = p.parse_args()
    cfg = MODELS[args.model]
    init_std = args.init_std if args.init_std is not None else default_init_std(cfg)

    ckpt = args.checkpoint or tempfile.mkdtemp(prefix="dsv3_bench_")
    save_pretrained(bench_model(cfg, init_std), ckpt)
    model = from_pretrained(ckpt, moe_impl=args.moe_impl)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    engine = Engine(model, cache_dtype=jnp.dtype(args.cache_dtype), unstack=not args.stacked)
    ours_bytes = bytes_per_token(jax.eval_shape(lambda: init_cache(cfg, 1, 64, jnp.dtype(args.cache_dtype))))
    print(f"model: {n_params / 1e6:.1f}M parameters, {cfg.n_layers} layers, dim {cfg.dim}, "
          f"{cfg.n_routed_experts} experts (moe_impl={args.moe_impl}, layers {'stacked' if args.stacked else 'unstacked'}); "
          f"checkpoint {ckpt}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; "
          f"{args.new_tokens} new tokens, greedy; HF torch threads {args.hf_threads}", flush=True)

    rows = []
    rng = np.random.default_rng(0)
    for ctx in args.context:
        for B in args.batch:
            prompts = rng.integers(3, cfg.vocab_size, (B, ctx)).astype(np.int32)
            t0 = time.perf_counter()
            plain = ours(engine, prompts, args.new_tokens, 0, args.repeats)
            spec = ours(engine, prompts, args.new_tokens, cfg.n_mtp_modules, args.repeats)
            ref = None if args.no_hf else hf(ckpt, prompts, args.new_tokens, args.hf_threads, args.repeats)
            rows.append((B, ctx, plain, spec, ref))
            print(f"  B={B} context={ctx}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    head = (f"{'B':>2} {'ctx':>5} | {'ours tok/s':>10} {'+MTP tok/s':>10} {'MTP x':>6} {'accept':>6} "
            f"{'tok/step':>8} | {'HF tok/s':>8} {'ours/HF':>7} {'+MTP/HF':>7} | {'same tokens':>11}")
    print(head)
    print("-" * len(head))
    for B, ctx, plain, spec, ref in rows:
        line = (f"{B:>2} {ctx:>5} | {plain['tok_s']:>10.1f} {spec['tok_s']:>10.1f} "
                f"{spec['tok_s'] / plain['tok_s']:>6.2f} {spec['acceptance']:>6.2f} {spec['tokens_per_step']:>8.2f} | ")
        if ref is None:
            line += f"{'-':>8} {'-':>7} {'-':>7} | {'-':>11}"
        else:
            same = plain["first_tokens"] == ref["first_tokens"] == spec["first_tokens"]
            line += (f"{ref['tok_s']:>8.1f} {plain['tok_s'] / ref['tok_s']:>7.2f} "
                     f"{spec['tok_s'] / ref['tok_s']:>7.2f} | {'yes' if same else 'NO':>11}")
        print(line)
    itemsize = jnp.dtype(args.cache_dtype).itemsize
    print("\nmean decode tokens/s (fastest run): " + "; ".join(
        f"B={B} ctx={ctx}: ours {plain['mean_tok_s']:.1f}, +MTP {spec['mean_tok_s']:.1f}"
        + ("" if ref is None else f", HF {ref['mean_tok_s']:.1f}") for B, ctx, plain, spec, ref in rows))
    print(f"KV cache bytes/token: ours {ours_bytes} ({args.cache_dtype}; (kv_lora_rank {cfg.kv_lora_rank} + "
          f"rope {cfg.qk_rope_head_dim}) x {cfg.n_layers} layers x {itemsize} B)", end="")
    if rows and rows[0][4] is not None:
        ref = rows[0][4]
        print(f"; HF {ref['bytes']:.0f} ({ref['dtype']}); ratio HF/ours {ref['bytes'] / ours_bytes:.2f}")
    else:
        print()


if __name__ == "__main__":
    main()
