"""LoRARequest: which adapter a request runs with (vLLM's ``vllm.lora.request``)."""

from __future__ import annotations

import hashlib

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, omit_defaults=True, array_like=True):
    """An adapter by name, a positive integer id unique per adapter, and its PEFT folder.

    A msgspec Struct (as vLLM's) so it travels inside the engine core's request messages.
    Two requests with the same name, id and path share the adapter's loaded weights and
    its prefix-cache entries; anything else keeps them apart.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path is required")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def key(self) -> tuple[int, str, str]:
        """What identifies the adapter's weights (its loaded copy, its device slot)."""
        return (self.lora_int_id, self.lora_name, self.lora_path)

    def cache_salt(self) -> bytes:
        """Seed of the request's prefix-cache block hashes: KV computed under one adapter is
        never reused under another (nor under the base model, whose seed is empty)."""
        raw = f"lora\0{self.lora_int_id}\0{self.lora_name}\0{self.lora_path}".encode()
        return hashlib.sha256(raw).digest()
