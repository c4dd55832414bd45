"""The runner's adapters: a loaded LRU on the host and ``max_loras`` slots on the device.

An adapter is read (and checked) when a request for it is admitted, so a bad adapter fails
that request alone; the request keeps its loaded adapter, so an LRU eviction never forces
a re-read mid-run. A step's adapters are put into device slots before its forward; a slot
whose adapter the step does not use is reused least recently used first. Slot tensors are
replaced, never written in place, so a step still running on the device keeps reading the
weights it was launched with.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelport.lora.config import LoRAConfig
from modelport.lora.layers import LoRAMapping, add_lora_layers
from modelport.lora.peft import LoRAAdapter, load_adapter
from modelport.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(
        self, model: nn.Module, config: LoRAConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.modules = add_lora_layers(model)
        self._loaded: OrderedDict[tuple, LoRAAdapter] = OrderedDict()
        self._slots: list[tuple | None] = [None] * config.max_loras
        self._slot_order: list[int] = list(range(config.max_loras))  # least recent first
        logger.info(
            "LoRA: %d projections take adapters (max_loras %d, max_lora_rank %d)",
            len(self.modules),
            config.max_loras,
            config.max_lora_rank,
        )

    def load(self, req: LoRARequest) -> LoRAAdapter:
        """The request's adapter, read on first use; ValueError if it cannot serve."""
        key = req.key
        adapter = self._loaded.get(key)
        if adapter is None:
            adapter = load_adapter(
                req.lora_name, req.lora_path, self.model, self.config.max_lora_rank
            )
            self._loaded[key] = adapter
            while len(self._loaded) > self.config.num_cpu_loras:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return adapter

    def list_loras(self) -> list[tuple]:
        return list(self._loaded)

    def remove(self, key: tuple) -> None:
        """Forget a loaded adapter (its running requests keep their copy)."""
        self._loaded.pop(key, None)
        for slot, held in enumerate(self._slots):
            if held == key:
                self._clear(slot)

    def mapping(self, scheduled: Sequence[Any]) -> LoRAMapping | None:
        """The step's adapter rows (None: no LoRA request in it), with every adapter of the
        step placed in a device slot."""
        rows: dict[tuple, list[int]] = {}
        adapters: dict[tuple, LoRAAdapter] = {}
        start = 0
        for s in scheduled:
            req = s.request
            lr = req.lora_request
            if lr is not None:
                key = lr.key
                rows.setdefault(key, []).extend(range(start, start + s.num_tokens))
                adapters[key] = req.lora_adapter
            start += s.num_tokens
        if not rows:
            return None
        if len(rows) > len(self._slots):
            raise RuntimeError(
                f"{len(rows)} adapters in one step, above max_loras "
                f"{len(self._slots)} (the scheduler should have held one back)"
            )
        groups = []
        for key, r in rows.items():
            slot = self._place(key, adapters[key], set(rows))
            idx = (
                None
                if len(r) == start
                else torch.tensor(r, dtype=torch.long).to(self.device, non_blocking=True)
            )
            groups.append((slot, idx))
        return LoRAMapping(groups)

    def _place(self, key: tuple, adapter: LoRAAdapter, in_step: set[tuple]) -> int:
        if key in self._slots:
            slot = self._slots.index(key)
        else:
            slot = next(s for s in self._slot_order if self._slots[s] not in in_step)
            self._clear(slot)
            for name, (a, b) in adapter.weights.items():
                self.modules[name].lora_slots[slot] = (
                    a.to(self.device, self.dtype),
                    b.to(self.device, self.dtype),
                )
            self._slots[slot] = key
        self._slot_order.remove(slot)
        self._slot_order.append(slot)
        return slot

    def _clear(self, slot: int) -> None:
        self._slots[slot] = None
        for mod in self.modules.values():
            mod.lora_slots.pop(slot, None)
