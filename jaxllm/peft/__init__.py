"""Parameter-efficient fine-tuning as pure transforms of the params tree: LoRA and its variants
(`lora.LoraAdapter`), their initialisations (`inits/`), quantised frozen kernels (`quantized_kernel`)."""

from jaxllm.peft.lora import LoraAdapter, lora_scale
from jaxllm.peft.lora_kernel import LoraKernel
from jaxllm.peft.quantized_kernel import QuantizedKernel, quantize

__all__ = ["LoraAdapter", "LoraKernel", "QuantizedKernel", "lora_scale", "quantize"]
