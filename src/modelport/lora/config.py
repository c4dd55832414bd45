"""LoRAConfig: vLLM's --enable-lora settings, resolved once at engine start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAConfig:
    # adapters that may run in one step (vLLM's max_loras): a request whose adapter would be
    # one more waits until one of the running adapters has no request left in the batch
    max_loras: int = 1
    # largest rank an adapter may have (vLLM's max_lora_rank); a larger one fails its request
    max_lora_rank: int = 16
    # adapters kept loaded on the host, least recently used dropped first (vLLM's
    # max_cpu_loras; None: max_loras)
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )

    @property
    def num_cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras
