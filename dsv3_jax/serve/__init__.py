"""Serving: an OpenAI-compatible HTTP server with continuous batching over the latent cache.

    python serve.py --hf_checkpoint DIR --port 8000 --speculative mtp

Layers, each in its own module: programs.py (the decode loop: K of `infer.programs.step` per
dispatch; prefill, insert and the step itself are infer's, which take per-row sampling settings
from `infer.sampling`, so requests with different temperatures share one compiled program),
batch.py (`DecodeBatch`: the decode slots over one latent cache, owned by one thread), text.py
(incremental detokenisation and stop strings), scheduler.py (`Scheduler`: the thread that admits,
decodes and retires requests), protocol.py (the OpenAI request fields and response objects),
server.py (the FastAPI app), metrics.py (Prometheus), main.py (the command).
"""
