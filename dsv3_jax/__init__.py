"""dsv3-jax: DeepSeek-V3 in JAX / Flax NNX."""

from dsv3_jax.config import PRESETS, ModelConfig, preset
from dsv3_jax.hf import from_pretrained, save_pretrained
from dsv3_jax.model import ModelOutput, Transformer

__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "Transformer", "from_pretrained", "preset",
           "save_pretrained"]
