"""Inference: latent KV cache, absorbed-MLA decoding, sampling, MTP speculative decoding.

    from dsv3_jax.infer import generate, SamplingConfig
    result = generate(model, [ids_a, ids_b], max_new_tokens=64, sampling=SamplingConfig(0.7, top_p=0.9),
                      speculative=1, eos_id=tok.eos_id)

The cache itself (`dsv3_jax/cache.py`) and the cached forward (`Transformer.forward_cached`, MLA's
absorbed form) belong to the model. Here: sampling.py (`SamplingConfig`, and the per-row
`RowSampling` every program takes), speculative.py (draft/verify), programs.py (the compiled
prefill/insert/step programs, which the server reuses), engine.py (`Engine`: the host loop,
disaggregation), load.py (a training run's newest checkpoint for inference).
"""

from dsv3_jax.cache import Cache, LatentCache, bytes_per_token, formula_bytes_per_token, init_cache
from dsv3_jax.infer.engine import Engine, GenerationResult, GenerationStats, generate
from dsv3_jax.infer.sampling import SamplingConfig

__all__ = ["Cache", "Engine", "GenerationResult", "GenerationStats", "LatentCache", "SamplingConfig",
           "bytes_per_token", "formula_bytes_per_token", "generate", "init_cache"]
