"""Generate text with a DeepSeek-V3 model: latent KV cache, absorbed MLA, optional MTP speculation
(the `dsv3-infer` command; `infer.py` calls this).

    python infer.py --hf_checkpoint DIR --prompt "Once upon a time" --max_new_tokens 64
    python infer.py --checkpoint runs/default --prompt_file prompts.txt --temperature 0.7 --top_p 0.9
    python infer.py --hf_checkpoint DIR --prompt "Hi" --chat --speculative mtp

Generated text streams to stdout (one prompt), or is printed per prompt as each finishes (a
prompt file: one prompt per non-blank line). Throughput, and the MTP acceptance rate with
--speculative, go to stderr. `--temperature 0` is greedy decoding. Bad input (a missing or
malformed checkpoint, an empty or too long prompt, token ids outside the model's vocabulary)
ends with a one-line message on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from dsv3_jax.errors import ConfigError, MissingFileError, UserError
from dsv3_jax.hf import from_pretrained
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.load import load_for_inference
from dsv3_jax.infer.sampling import SamplingConfig
from dsv3_jax.tokenizer import load_tokenizer


# ---- arguments ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv3-infer", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="WORKDIR", help="a training run's workdir")
    src.add_argument("--hf_checkpoint", metavar="DIR", help="an HF-format directory (config.json, "
                     "safetensors, tokenizer.json)")
    text = p.add_mutually_exclusive_group(required=True)
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
    p.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token to raw prompts")
    p.add_argument("--cache_dtype", choices=["bfloat16", "float32"], default="bfloat16")
    return p.parse_args(argv)


# ---- model and tokenizer ------------------------------------------------------------------------
def load(args):
    if args.hf_checkpoint:
        return from_pretrained(args.hf_checkpoint), load_tokenizer(args.hf_checkpoint)
    return load_for_inference(args.checkpoint)


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
        if not texts:
            raise ConfigError(f"--prompt_file {args.prompt_file}: no prompts (every line is blank)")
    if any(not t.strip() for t in texts):
        raise ConfigError("empty prompt: give some text to continue")
    if args.chat:
        if tok.chat_template is None:
            print("infer.py: note: the tokenizer has no chat template; using the raw prompt", file=sys.stderr)
        else:
            texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
                     for t in texts]
    ids = [tok.encode(t) for t in texts]
    if args.bos and not args.chat and tok.bos_id is not None:
        ids = [[tok.bos_id] + x for x in ids]
    return texts, ids


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
    model, tok = load(args)
    cfg = model.cfg
    _, prompts = read_prompts(args, tok)
    n_draft = 0
    if args.speculative == "mtp":
        if cfg.n_mtp_modules == 0:
            raise ConfigError("--speculative mtp: the checkpoint has no MTP module")
        n_draft = cfg.n_mtp_modules

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    engine = Engine(model, cache_dtype=jnp.dtype(args.cache_dtype))
    printer = Printer(tok, len(prompts), args.max_new_tokens, tok.eos_id)
    result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                             eos_id=tok.eos_id, speculative=n_draft, batch_size=args.batch_size or None,
                             on_tokens=printer)
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
    """The project's own errors are one line on stderr and exit 1; anything else keeps its traceback."""
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 1
    return 0
