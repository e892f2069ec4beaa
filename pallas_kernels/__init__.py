"""FP8 kernels for DeepSeek-V3 (report §3.3): fine-grained quantization and
block-scaled GEMMs with FP32 promotion every 128 of K.

    quantize_act_1x128 / quantize_act_128x1 / quantize_weight_128x128   fp8_quant
    fp8_block_matmul(impl="auto"|"reference"|"pallas"|"mosaic_gpu")     fp8_matmul
    fp8_linear (custom_vjp: Fprop, Dgrad, Wgrad all in FP8)              fp8_matmul
    mgpu_block_matmul (Hopper wgmma kernel on aligned operands)          fp8_matmul_mgpu
    fp8_grouped_matmul (MoE, expert-sorted rows)                         fp8_grouped
    fp8_grouped_linear (custom_vjp: the MoE experts' training GEMMs)     fp8_grouped
"""
from pallas_kernels.fp8_grouped import (Fp8GroupedTuning, fp8_grouped_linear, fp8_grouped_matmul,
                                        fp8_grouped_matmul_reference)
from pallas_kernels.fp8_matmul import (Fp8MatmulTuning, fp8_block_matmul,
                                       fp8_block_matmul_reference, fp8_linear)
from pallas_kernels.fp8_matmul_mgpu import HAS_MGPU, mgpu_block_matmul
from pallas_kernels.common import FP8, FP8_MAX, TILE
from pallas_kernels.fp8_quant import (dequantize_act_1x128,
                                      dequantize_act_128x1, dequantize_weight_128x128,
                                      quantize_act_1x128, quantize_act_128x1,
                                      quantize_weight_128x128)

__all__ = [
    "FP8", "FP8_MAX", "TILE", "HAS_MGPU",
    "quantize_act_1x128", "quantize_act_128x1", "quantize_weight_128x128",
    "dequantize_act_1x128", "dequantize_act_128x1", "dequantize_weight_128x128",
    "Fp8MatmulTuning", "fp8_block_matmul", "fp8_block_matmul_reference", "fp8_linear",
    "mgpu_block_matmul",
    "Fp8GroupedTuning", "fp8_grouped_linear", "fp8_grouped_matmul", "fp8_grouped_matmul_reference",
]
