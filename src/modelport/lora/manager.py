"""The runner's adapters: a loaded LRU on the host and ``max_loras`` slots on the device.

An adapter is read (and checked) when a request for it is admitted, so a bad adapter fails
that request alone; the request keeps its loaded adapter, so an LRU eviction never forces
a re-read mid-run. A step's adapters are put into device slots before its forward; a slot
whose adapter the step does not use is reused least recently used first. Slot tensors are
replaced, never written in place, so a step still running on the device keeps reading the
weights it was launched with.

Under tensor parallelism rank 0's manager decides everything (admission, slots, the step's
rows); each placement and clearing is also recorded (``take_placements``) and sent with the
step to the other ranks, whose managers ``follow`` it. Adapters are read for the whole
model; every rank keeps its own part of each pair when placing it
(parallel/tensor_parallel.lora_slice).
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
from modelport.parallel.tensor_parallel import lora_slice

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(
        self,
        model: nn.Module,
        config: LoRAConfig,
        device: torch.device,
        dtype: torch.dtype,
        record_placements: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.modules = add_lora_layers(model)
        self._loaded: OrderedDict[tuple, LoRAAdapter] = OrderedDict()
        self._slots: list[tuple | None] = [None] * config.max_loras
        self._slot_order: list[int] = list(range(config.max_loras))  # least recent first
        # (slot, the adapter's whole weights, or None: cleared) since take_placements
        self._placements: list[tuple[int, dict | None]] | None = [] if record_placements else None
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
            logger.info("LoRA adapter %r (id %d) read from %s", req.lora_name,
                        req.lora_int_id, req.lora_path)
            while len(self._loaded) > self.config.num_cpu_loras:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return adapter

    def list_loras(self) -> list[tuple]:
        return list(self._loaded)

    def slotted(self) -> list[tuple]:
        """The adapters in device slots (one evicted from the host LRU may still be here)."""
        return [k for k in self._slots if k is not None]

    def remove(self, key: tuple) -> None:
        """Forget a loaded adapter (its running requests keep their copy)."""
        if self._loaded.pop(key, None) is not None or key in self._slots:
            logger.info("LoRA adapter %r (id %d) removed", key[1], key[0])
        for slot, held in enumerate(self._slots):
            if held == key:
                self._clear(slot)
                if self._placements is not None:  # the other ranks clear it too
                    self._placements.append((slot, None))

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
        spec = [
            (self._place(key, adapters[key], set(rows)), None if len(r) == start else r)
            for key, r in rows.items()
        ]
        return self._mapping(spec)

    def _mapping(self, spec: list[tuple[int, list[int] | None]]) -> LoRAMapping:
        groups = [
            (
                slot,
                None
                if r is None
                else torch.tensor(r, dtype=torch.long).to(self.device, non_blocking=True),
            )
            for slot, r in spec
        ]
        return LoRAMapping(groups, spec)

    def take_placements(self) -> list[tuple[int, dict | None]]:
        """Rank 0: the slots placed or cleared since the last call, for the other ranks."""
        assert self._placements is not None, "placements are recorded under tensor parallelism"
        out, self._placements = self._placements, []
        return out

    def follow(
        self, placements: list[tuple[int, dict | None]], spec: list[tuple[int, list[int] | None]]
    ) -> LoRAMapping:
        """Another rank: take rank 0's slot changes (a placement replaces what the slot
        held), then its step's rows."""
        for slot, weights in placements:
            self._clear(slot)
            if weights is not None:
                self._fill(slot, weights)
        return self._mapping(spec)

    def _place(self, key: tuple, adapter: LoRAAdapter, in_step: set[tuple]) -> int:
        if key in self._slots:
            slot = self._slots.index(key)
        else:
            slot = next(s for s in self._slot_order if self._slots[s] not in in_step)
            self._clear(slot)
            self._fill(slot, adapter.weights)
            self._slots[slot] = key
            if self._placements is not None:
                self._placements.append((slot, adapter.weights))
        self._slot_order.remove(slot)
        self._slot_order.append(slot)
        return slot

    def _fill(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (a, b) in weights.items():
            mod = self.modules[name]
            a, b = lora_slice(mod, a, b)  # this rank's part (tensor parallel), else a, b
            mod.lora_slots[slot] = (a.to(self.device, self.dtype), b.to(self.device, self.dtype))

    def _clear(self, slot: int) -> None:
        self._slots[slot] = None
        for mod in self.modules.values():
            mod.lora_slots.pop(slot, None)
