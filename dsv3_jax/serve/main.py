"""Serve a DeepSeek-V3 model over an OpenAI-compatible HTTP API (the `dsv3-serve` command;
`serve.py` calls this).

    python serve.py --hf_checkpoint DIR --port 8000 --speculative mtp
    python serve.py --checkpoint runs/default --slots 16 --max_len 2048 --max_queue 128

The model loads the way `infer.py` loads it (the same flags: --checkpoint WORKDIR or
--hf_checkpoint DIR, --dtype, --keep_fp8, --mesh, --prefill_mesh, --attn_impl) on the scheduler thread while
the HTTP server already answers: /health says 503 until the model is loaded and every program is
compiled, then 200. A model that fails to load ends the server with a one-line message and exit
status 1. SIGTERM (or Ctrl-C) stops accepting connections, lets every request in flight finish,
and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from dsv3_jax.errors import ConfigError, UserError
from dsv3_jax.infer.args import add_model_args


# ---- arguments ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv3-serve", description=__doc__.split("\n\n")[0])
    add_model_args(p)  # --checkpoint / --hf_checkpoint and the weights and devices, as infer.py
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served_model_name", default=None,
                   help="the `model` clients send (default: the checkpoint directory's name)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (decode batch rows)")
    p.add_argument("--max_len", type=int, default=None,
                   help="cache slots per sequence: prompt + output (+ MTP drafts); default: the model's "
                        "max_seq_len (at most 4096) plus the drafts")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond that, 429")
    p.add_argument("--steps_per_dispatch", type=int, default=4,
                   help="decode steps per device dispatch (streaming granularity; a waiting request joins between dispatches)")
    p.add_argument("--prefill_chunk", type=int, default=512,
                   help="a longer prompt is prefilled this many tokens per scheduler turn, a decode dispatch "
                        "between chunks (so it never stalls the running requests for its whole prefill)")
    p.add_argument("--mixed_prefill", type=int, default=32,
                   help="a prompt of at most --prefill_chunk tokens joins the decode steps this many tokens "
                        "per step (Sarathi's mixed batch: no prefill of its own for the running requests to wait "
                        "for); 0: prefill it alone. Not with --prefill_mesh (where prefill has devices of its own)")
    p.add_argument("--no_prefix_reuse", dest="prefix_reuse", action="store_false",
                   help="run every joining prompt whole; by default a prompt starts past the prefix a free "
                        "slot's latents already hold (a shared system prompt, a chat's earlier turns)")
    p.add_argument("--prefix_pool", type=int, default=None,
                   help="cache rows (beside the --slots decoding ones) that keep the prefixes freed rows held "
                        "once new prompts take those rows, least recently used first (default: as many as "
                        "--slots, twice the latent cache memory; 0: none)")
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP module(s), verify in one step")
    p.add_argument("--cache_dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0, help="the sampling key (requests add their own seed)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    for name in ("slots", "steps_per_dispatch", "prefill_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_queue < 0:
        p.error("--max_queue must be >= 0")
    if args.mixed_prefill < 0:
        p.error("--mixed_prefill must be >= 0 (0: off)")
    if args.prefix_pool is None:
        args.prefix_pool = args.slots
    if args.prefix_pool < 0:
        p.error("--prefix_pool must be >= 0 (0: none)")
    return args


# ---- the model, on the scheduler thread -----------------------------------------------------------
def mixed_chunk(tokens: int, max_len: int, n_draft: int) -> int:
    """--mixed_prefill as the batch takes it: at most max_len, rounded down to whole rows of the
    n_draft + 1 tokens a decoding row verifies per step (at least one row)."""
    if not tokens:
        return 0
    rows = max(1, min(tokens, max_len) // (n_draft + 1))
    return rows * (n_draft + 1)


def start_batch(args):
    """Load the model as infer.py does and build the decode batch -> (DecodeBatch, tokenizer)."""
    import jax.numpy as jnp

    from dsv3_jax.infer.main import load
    from dsv3_jax.serve.batch import DecodeBatch

    t0 = time.perf_counter()
    model, tok, mesh, prefill_mesh = load(args)
    cfg = model.cfg
    if tok is None:
        raise ConfigError("the checkpoint has no tokenizer (tokenizer.json): the server needs one")
    n_draft = 0
    if args.speculative == "mtp":
        if cfg.n_mtp_modules == 0:
            raise ConfigError("--speculative mtp: the checkpoint has no MTP module")
        n_draft = cfg.n_mtp_modules
    max_len = args.max_len or min(cfg.max_seq_len, 4096) + n_draft
    if max_len < n_draft + 2:
        raise ConfigError(f"--max_len {max_len}: too small to hold a prompt and a token")
    batch = DecodeBatch(model, slots=args.slots, max_len=max_len, n_draft=n_draft,
                        steps_per_dispatch=args.steps_per_dispatch, cache_dtype=jnp.dtype(args.cache_dtype),
                        mesh=mesh, prefill_mesh=prefill_mesh, prefill_chunk=args.prefill_chunk,
                        mixed=0 if args.prefill_mesh else mixed_chunk(args.mixed_prefill, max_len, n_draft),
                        prefix_reuse=args.prefix_reuse, prefix_pool=args.prefix_pool, seed=args.seed)
    log = logging.getLogger("uvicorn.error")
    log.info("loaded in %.1f s; compiling %d prompt buckets %s, %d slots x %d cache slots, %s, %s",
             time.perf_counter() - t0, len(batch.buckets), batch.buckets, args.slots, max_len,
             f"MTP with {n_draft} draft(s)" if n_draft else "no speculation",
             f"prompts join decode steps {batch.mixed} tokens at a time" if batch.mixed else "prompts prefilled alone")
    return batch, tok


# ---- the server ------------------------------------------------------------------------------------
def serve(args) -> int:
    import uvicorn

    from dsv3_jax.serve.metrics import Metrics
    from dsv3_jax.serve.scheduler import Scheduler
    from dsv3_jax.serve.server import create_app

    name = args.served_model_name or os.path.basename(os.path.normpath(args.hf_checkpoint or args.checkpoint))
    metrics = Metrics(name)
    server: uvicorn.Server | None = None

    def fatal(message: str) -> None:  # start-up failed on the scheduler thread: stop serving
        if server is not None:
            server.should_exit = True

    scheduler = Scheduler(lambda: start_batch(args), max_queue=args.max_queue, metrics=metrics, on_fatal=fatal)
    app = create_app(scheduler, metrics, name)
    t0 = time.perf_counter()
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           lifespan="on"))
    _log_when_ready(scheduler, t0)
    # uvicorn handles SIGTERM/SIGINT gracefully (stop accepting, finish responses) and then re-raises
    # the signal under the handler found at start; a no-op one makes that last step an exit with 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if scheduler.error is not None:
        print(f"serve.py: error: {scheduler.error}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def _log_when_ready(scheduler, t0: float) -> None:
    import threading

    def wait():
        scheduler.ready.wait()
        b = scheduler.batch
        logging.getLogger("uvicorn.error").info("ready in %.1f s: %d programs compiled, context %d tokens",
                                             time.perf_counter() - t0, b.compiled_programs(), b.context)

    threading.Thread(target=wait, daemon=True).start()


def main(argv=None) -> int:
    """The project's own errors are one line on stderr and exit 1; anything else keeps its traceback."""
    args = parse_args(argv)
    try:
        from dsv3_jax.infer.main import setup_devices

        setup_devices(args)
        return serve(args)
    except UserError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
