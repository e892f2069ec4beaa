"""Inference: latent KV cache, absorbed-MLA decoding, sampling, MTP speculative decoding.

    from dsv3_jax.infer import generate, SamplingConfig
    result = generate(model, [ids_a, ids_b], max_new_tokens=64, sampling=SamplingConfig(0.7, top_p=0.9),
                      speculative=1, eos_id=tok.eos_id)

Files: cache.py (the cache), decode.py (absorbed MLA and the cached forward), sampling.py,
speculative.py (draft/verify), engine.py (the compiled prefill/insert/step programs),
generate.py (the host loop, `Engine`, disaggregation).
"""

from dsv3_jax.infer.cache import Cache, LatentCache, bytes_per_token, formula_bytes_per_token, init_cache
from dsv3_jax.infer.generate import Engine, GenerationResult, GenerationStats, generate
from dsv3_jax.infer.sampling import SamplingConfig

__all__ = ["Cache", "Engine", "GenerationResult", "GenerationStats", "LatentCache", "SamplingConfig",
           "bytes_per_token", "formula_bytes_per_token", "generate", "init_cache"]
