"""The ISCA '25 paper's numbers, computed from this repository's configs and code.

"Insights into DeepSeek-V3: Scaling Challenges and Reflections on Hardware for AI
Architectures" (Zhao et al., ISCA '25; P1) argues with arithmetic. Each module here redoes one
piece of it from `ModelConfig` presets and the functions the trainer and the inference engine
use, and returns rows of (paper's figure, ours):

  kv_cache      Table 1: KV cache per token, MLA against GQA
  train_flops   Table 2: training GFLOP per token (and Table 4's TFLOPS)
  ep_bound      §2.3.2: the EP all-to-all bound on time per output token
  moe_economics §2.2: total vs activated parameters, local decode bounds
  network       Table 3: fat trees, multi-plane fat tree, Slim Fly, Dragonfly
  fp8           §3.1: FP8 accumulation precision (the emulation behind bench/fp8_accumulation.py)
  logfmt        §3.2: LogFMT against E4M3 / E5M2 on MoE outputs

`python -m dsv3_jax.analysis [--json] [--plots DIR]` prints them (see `__main__`).
"""

from dsv3_jax.analysis.report import Row

__all__ = ["Row"]
