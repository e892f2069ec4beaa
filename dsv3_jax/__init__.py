"""dsv3-jax: DeepSeek-V3 in JAX / Flax NNX.

Shape letters: one legend for the whole package (docstrings, shape comments, einsum strings).

    B  batch (sequences)                 S  query tokens of a call      T  key/value positions, cache slots
    D  `dim` (the residual width)        V  vocabulary                  L  layers (of one stack)
    H  attention heads                   Q  `q_lora_rank`               C  `kv_lora_rank`
    Z  `qk_nope_head_dim`                R  `qk_rope_head_dim`          O  `v_head_dim`
    F  FFN hidden width (`inter_dim`, `moe_inter_dim`)
    N  tokens flattened (B*S) in MoE     E  routed experts              K  experts activated per token
    G  expert groups                     J  expert slots a token uses on one EP shard
    X  EP degree (expert-axis shards)    El experts per EP shard (E/X)  U  token slots per EP (source, destination) pair
    P  pipeline stages                   M  micro-batches               Tk pipeline ticks
    Dm MTP depth (modules)               A  tokens drafted per step     W  draft window
    Tb token-buffer length

A letter means the same thing in every file; two-letter names (El, Tk, Dm, Tb) are single symbols.
"""

from dsv3_jax.config import PRESETS, ModelConfig, preset
from dsv3_jax.hf import from_pretrained, save_pretrained
from dsv3_jax.model import ModelOutput, Transformer

__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "Transformer", "from_pretrained", "preset",
           "save_pretrained"]
