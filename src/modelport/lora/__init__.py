"""Multi-LoRA serving, as vLLM's: ``LoRARequest`` per request, many adapters in one batch.

request.py  LoRARequest (vLLM's ``vllm.lora.request.LoRARequest``), crosses to the core
config.py   LoRAConfig: max_loras (per step), max_lora_rank, max_cpu_loras (loaded LRU)
peft.py     reading and checking a PEFT adapter folder against the model
layers.py   the linear layers' LoRA forward and the per-step adapter mapping
manager.py  the runner's adapters: a loaded LRU and max_loras device slots
"""

from modelport.lora.request import LoRARequest

__all__ = ["LoRARequest"]
