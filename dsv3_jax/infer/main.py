"""Generate text with a DeepSeek-V3 model: latent KV cache, absorbed MLA, optional MTP speculation
(the `dsv3-infer` command; `infer.py` calls this).

    python infer.py --hf_checkpoint DIR --prompt "Once upon a time" --max_new_tokens 64
    python infer.py --checkpoint runs/default --prompt_file prompts.txt --temperature 0.7 --top_p 0.9
    python infer.py --hf_checkpoint DIR --prompt "Hi" --chat --speculative mtp
    python infer.py --hf_checkpoint DIR --keep_fp8 --mesh 1,1,8 --prompt "Hi"     # experts over 8 devices
    python infer.py --hf_checkpoint DIR --keep_fp8 --dry_run --num_cpu_devices 8 --mesh 1,1,8 \
        --batch_size 32 --max_len 8192                        # will it fit? compile only, from config.json

Generated text streams to stdout (one prompt), or is printed per prompt as each finishes (a
prompt file: one prompt per non-blank line). Throughput, and the MTP acceptance rate with
--speculative, go to stderr. `--temperature 0` is greedy decoding. Bad input ends with a one-line
message on stderr: exit status 2 for a usage or config mistake (an empty or too long prompt, token
ids outside the vocabulary, a sampling value out of range, a --mesh that does not divide the
experts), 1 for a file that cannot be used (a missing or malformed checkpoint or tokenizer); 130
after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp

from dsv3_jax.errors import ConfigError, MissingFileError, UserError
from dsv3_jax.hf import from_pretrained, pretrained_config
from dsv3_jax.infer import dryrun
from dsv3_jax.infer.args import add_model_args
from dsv3_jax.infer.engine import STEPS_PER_DISPATCH, Engine
from dsv3_jax.infer.load import load_for_inference
from dsv3_jax.infer.sampling import SamplingConfig
from dsv3_jax.tokenizer import load_tokenizer


# ---- arguments ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv3-infer", description=__doc__.split("\n\n")[0])
    weights = add_model_args(p)
    weights.add_argument("--dry_run", action="store_true",
                         help="from config.json alone: compile prefill and the decode step for --batch_size x "
                              "--max_len on the mesh and print the memory per device; reads no tensor")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="the prompt text")
    text.add_argument("--prompt_file", metavar="FILE", help="one prompt per non-blank line")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=0, help="sequences decoded together (0: all prompts)")
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP module(s), verify in one step")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--chat_template_kwargs", metavar="JSON", default=None,
                   help="extra chat-template arguments, e.g. '{\"thinking\": true}' (DeepSeek V3.1)")
    p.add_argument("--no_bos", action="store_true",
                   help="do not prepend BOS to raw prompts (default: as the tokenizer's add_bos_token says)")
    p.add_argument("--cache_dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--max_len", type=int, default=None,
                   help="cache slots per sequence (default: the longest prompt + max_new_tokens, rounded up)")
    p.add_argument("--steps_per_dispatch", type=int, default=STEPS_PER_DISPATCH,
                   help="decode steps per device dispatch (the host reads tokens back, and streams them, once per "
                        "dispatch)")
    args = p.parse_args(argv)
    if not args.dry_run and args.prompt is None and args.prompt_file is None:
        p.error("one of the arguments --prompt --prompt_file is required (or --dry_run)")
    return args


# ---- devices and mesh ---------------------------------------------------------------------------
def setup_devices(args) -> None:
    """Fake CPU devices must be requested before JAX starts its backend."""
    if args.num_cpu_devices is not None:
        if args.num_cpu_devices < 1:
            raise ConfigError(f"--num_cpu_devices {args.num_cpu_devices}: expected >= 1")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.num_cpu_devices}")


def _mesh_shape(spec: str, flag: str, n_routed_experts: int) -> tuple[int, int, int]:
    try:
        data, pipeline, expert = (int(v) for v in spec.split(","))
    except ValueError:
        raise ConfigError(f"--{flag} {spec!r}: expected three integers data,pipeline,expert, e.g. 1,1,8") from None
    if min(data, pipeline, expert) < 1:
        raise ConfigError(f"--{flag} {spec!r}: every degree must be >= 1")
    if n_routed_experts % expert:
        raise ConfigError(f"--{flag} {spec!r}: expert={expert} must divide the model's {n_routed_experts} routed "
                          "experts")
    return data, pipeline, expert


def make_mesh(spec: str | None, n_routed_experts: int, devices=None, flag: str = "mesh"):
    """--mesh D,P,E, or all `devices` (default: all) with experts over the largest count that divides them."""
    from dsv3_jax.sharding import make_mesh as mesh_of

    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if spec is None:
        expert = max(e for e in range(1, n + 1) if n % e == 0 and n_routed_experts % max(e, 1) == 0)
        return mesh_of(n // expert, 1, expert, devices)
    return mesh_of(*_mesh_shape(spec, flag, n_routed_experts), devices)


def make_meshes(args, n_routed_experts: int):
    """-> (decode mesh, prefill mesh): both None on one device without --mesh; the same mesh unless
    --prefill_mesh takes the first devices for prefill, the decode mesh then the rest."""
    if not args.prefill_mesh:
        if not (args.mesh or jax.device_count() > 1):
            return None, None
        mesh = make_mesh(args.mesh, n_routed_experts)
        return mesh, mesh
    n_prefill = math.prod(_mesh_shape(args.prefill_mesh, "prefill_mesh", n_routed_experts))
    devices = jax.devices()
    if n_prefill >= len(devices):
        raise ConfigError(f"--prefill_mesh {args.prefill_mesh!r}: {n_prefill} devices leave none of the "
                          f"{len(devices)} to decode")
    return (make_mesh(args.mesh, n_routed_experts, devices[n_prefill:]),
            make_mesh(args.prefill_mesh, n_routed_experts, devices[:n_prefill], "prefill_mesh"))


def mesh_config(cfg, mesh):
    """Expert-sharded weights decode with expert parallelism (tokens travel, weights stay)."""
    return cfg.replace(moe_impl="ep") if mesh.shape["expert"] > 1 else cfg



# ---- model and tokenizer ------------------------------------------------------------------------
def load(args):
    """-> (model, tokenizer, decode mesh or None, prefill mesh or None: see make_meshes)."""
    if args.hf_checkpoint:
        cfg = pretrained_config(args.hf_checkpoint, dtype=args.dtype)
        mesh, prefill_mesh = make_meshes(args, cfg.n_routed_experts)
        overrides = {} if mesh is None else {"moe_impl": mesh_config(cfg, mesh).moe_impl}
        if overrides.get("moe_impl") == "ep" and prefill_mesh.shape["expert"] == 1:
            raise ConfigError(f"--prefill_mesh {args.prefill_mesh!r}: the decode mesh splits experts (expert "
                              "parallelism), so the prefill mesh must too (expert >= 2)")
        if args.attn_impl:
            overrides["attn_impl"] = args.attn_impl
        model = from_pretrained(args.hf_checkpoint, dtype=args.dtype, keep_fp8=args.keep_fp8, mesh=mesh,
                                **overrides)
        return model, load_tokenizer(args.hf_checkpoint), mesh, prefill_mesh
    for flag in ("dtype", "mesh", "prefill_mesh"):
        if getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag} applies to --hf_checkpoint; a training workdir keeps its own")
    return (*load_for_inference(args.checkpoint), None, None)


def dry_run(args) -> None:
    if not args.hf_checkpoint:
        raise ConfigError("--dry_run reads an HF directory's config.json: give --hf_checkpoint")
    overrides = {"attn_impl": args.attn_impl} if args.attn_impl else {}
    cfg = pretrained_config(args.hf_checkpoint, dtype=args.dtype, keep_fp8=args.keep_fp8, **overrides)
    mesh = make_mesh(args.mesh, cfg.n_routed_experts)
    run = dryrun.DryRun(batch=args.batch_size or 1, max_len=args.max_len or cfg.max_seq_len,
                        n_draft=cfg.n_mtp_modules if args.speculative == "mtp" else 0, cache_dtype=args.cache_dtype)
    print(dryrun.format_report(dryrun.report(mesh_config(cfg, mesh), mesh, run)))


# ---- prompts ------------------------------------------------------------------------------------
def read_prompts(args, tok) -> tuple[list[str], list[list[int]]]:
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise MissingFileError(f"--prompt_file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt_file {args.prompt_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not texts:
            raise ConfigError(f"--prompt_file {args.prompt_file}: no prompts (every line is blank)")
    for t in texts:  # undecodable command-line bytes arrive as lone surrogates
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError("--prompt: not valid UTF-8 text") from None
    if any(not t.strip() for t in texts):
        raise ConfigError("empty prompt: give some text to continue")
    if args.chat and tok.chat_template is not None:  # the template writes its own BOS
        ids = tok.apply_chat_template([[{"role": "user", "content": t}] for t in texts], add_generation_prompt=True,
                                      tokenize=True, **template_kwargs(args))
        return texts, ids
    if args.chat:
        print("infer.py: note: the tokenizer has no chat template; using the raw prompt", file=sys.stderr)
    return texts, [tok.encode(t, add_bos=False if args.no_bos else None) for t in texts]


def template_kwargs(args) -> dict:
    """--chat_template_kwargs '{"thinking": true}' -> the template's extra arguments."""
    if args.chat_template_kwargs is None:
        return {}
    try:
        kwargs = json.loads(args.chat_template_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--chat_template_kwargs {args.chat_template_kwargs!r}: not JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--chat_template_kwargs {args.chat_template_kwargs!r}: expected a JSON object")
    return kwargs


# ---- generation with streaming ------------------------------------------------------------------
class Printer:
    """Streams one sequence's text as it grows; with several prompts prints each when finished."""

    def __init__(self, tok, n: int, budget: int, eos_id: int):
        self.tok, self.n, self.budget, self.eos_id = tok, n, budget, eos_id
        self.ids = [[] for _ in range(n)]
        self.shown = ""

    def text(self, i: int) -> str:
        ids = self.ids[i]
        return self.tok.decode(ids[:-1] if ids and ids[-1] == self.eos_id else ids)

    def __call__(self, i: int, new: list[int]):
        self.ids[i].extend(new)
        if self.n == 1:
            text = self.text(0)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                return
            sys.stdout.write(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)
            sys.stdout.flush()
            self.shown = text
        elif self.ids[i][-1] == self.eos_id or len(self.ids[i]) >= self.budget:
            print(f"[{i}] {self.text(i)}", flush=True)

    def finish(self, tokens: list[list[int]]):
        if self.n == 1:
            text = self.tok.decode([t for t in tokens[0] if t != self.eos_id])
            sys.stdout.write(text[len(self.shown):] + "\n")
        else:  # sequences cut short by the context end
            for i, ids in enumerate(tokens):
                if ids and ids[-1] != self.eos_id and len(ids) < self.budget:
                    print(f"[{i}] {self.text(i)}", flush=True)
        sys.stdout.flush()


def run(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens {args.max_new_tokens}: expected >= 1")
    if args.batch_size < 0:
        raise ConfigError(f"--batch_size {args.batch_size}: expected >= 1 (0: all prompts together)")
    if args.steps_per_dispatch < 1:
        raise ConfigError(f"--steps_per_dispatch {args.steps_per_dispatch}: expected >= 1")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # before the load
    model, tok, mesh, prefill_mesh = load(args)
    cfg = model.cfg
    _, prompts = read_prompts(args, tok)
    for i, p in enumerate(prompts):  # the engine stops at the context's end: say so, once per prompt
        room = cfg.max_seq_len - len(p)
        if 0 < room < args.max_new_tokens:
            print(f"infer.py: note: prompt {i} has {len(p)} tokens; the context (max_seq_len {cfg.max_seq_len}) "
                  f"leaves room for {room} new tokens, not --max_new_tokens {args.max_new_tokens}", file=sys.stderr)
    n_draft = 0
    if args.speculative == "mtp":
        if cfg.n_mtp_modules == 0:
            raise ConfigError("--speculative mtp: the checkpoint has no MTP module")
        n_draft = cfg.n_mtp_modules

    engine = Engine(model, cache_dtype=jnp.dtype(args.cache_dtype), prefill_mesh=prefill_mesh, decode_mesh=mesh)
    del model  # the engine holds its own (unstacked) copy of the layers: let the stacked arrays go
    printer = Printer(tok, len(prompts), args.max_new_tokens, tok.eos_id)
    result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                             eos_id=tok.eos_id, speculative=n_draft, batch_size=args.batch_size or None,
                             max_len=args.max_len, steps_per_dispatch=args.steps_per_dispatch, on_tokens=printer)
    printer.finish(result.tokens)

    # ---- report ---------------------------------------------------------------------------------
    s = result.stats
    total = s.prefill_s + s.decode_s
    print(f"infer.py: {s.generated_tokens} tokens in {total:.2f} s ({s.generated_tokens / total:.1f} tokens/s); "
          f"prefill {s.prompt_tokens} tokens in {s.prefill_s:.2f} s, decode {s.decode_tokens_per_s:.1f} tokens/s "
          "(first call includes compilation)", file=sys.stderr)
    if n_draft:
        print(f"infer.py: MTP speculation with {n_draft} draft token(s): acceptance rate {s.acceptance_rate:.3f}, "
              f"{s.tokens_per_step:.2f} tokens per verification step", file=sys.stderr)


def main(argv=None) -> int:
    """The project's own errors are one line on stderr and exit 2 (usage, config, prompt, sampling
    values) or 1 (files, checkpoints, tokenizers); Ctrl-C exits 130; anything else keeps its traceback."""
    args = parse_args(argv)
    try:
        setup_devices(args)
        dry_run(args) if args.dry_run else run(args)
    except UserError as e:  # usage and config mistakes exit 2, everything else the user can fix 1
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's status for SIGINT
        print("infer.py: interrupted", file=sys.stderr)
        return 130
    return 0
