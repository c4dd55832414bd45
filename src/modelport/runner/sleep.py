"""Sleep mode's weights (vLLM's LLM.sleep / wake_up): give their device memory back between
generation phases and restore it.

Why storages are resized rather than tensors replaced: one weight is reached from many
places (tied embeddings, views of packed q/k/v, fused-op modules, LoRA wrappers, a draft
head sharing the embedding). Shrinking its storage to 0 bytes frees the memory while every
tensor object keeps pointing at that same storage; growing it back restores them all at
once. The memory comes back at a new device address, so whatever captured addresses (CUDA
graphs) is dropped at sleep and captured again after wake-up (ModelRunner.wake_up).

Level 1 copies each storage to pinned host memory first (on a CPU device the weights stay
where they are: the host is where they would go). Level 2 keeps no copy of the weights the
loader built (``built_storages`` at load time): wake-up builds the model again from its
checkpoint (or the dummy load format with the same seed) and copies that into the storages.
Device tensors the loader did not build (LoRA slots, a draft model) get level 1 either way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

# what modules build lazily from their weights at the first step (a CPU decode plan holds
# the weights' raw addresses; the int8 greedy head is a copy): dropped at sleep, so the next
# step after wake-up builds them again from the restored weights
_DERIVED = ("_cpu_decode_plan", "int8_greedy")


def module_storages(models: Iterable[torch.nn.Module | None],
                    device: torch.device) -> dict[str, torch.UntypedStorage]:
    """Every storage that the modules' tensors (parameters, buffers, plain tensor attributes)
    on ``device`` use, once, under the first "module.attr" name reaching it. The names of two
    builds by the same code match, which is what a level-2 wake-up relies on."""
    seen: set[int] = set()
    out: dict[str, torch.UntypedStorage] = {}
    for i, model in enumerate(models):
        if model is None:
            continue
        for mname, mod in model.named_modules():
            tensors = [*mod._parameters.items(), *mod._buffers.items(),
                       *((k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor))]
            for attr, t in tensors:
                if t is None or t.device.type != device.type:
                    continue
                s = t.untyped_storage()
                if s.nbytes() == 0 or s.data_ptr() in seen:
                    continue
                seen.add(s.data_ptr())
                out[f"{i}:{mname}.{attr}"] = s
    return out


def forget_derived(models: Iterable[torch.nn.Module | None]) -> None:
    for model in models:
        for mod in model.modules() if model is not None else ():
            for name in _DERIVED:  # the class's default (None) or nothing: built again
                vars(mod).pop(name, None)


def _as_bytes(s: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=s.device).set_(s)


def _free(s: torch.UntypedStorage) -> bool:
    """Shrink ``s`` to nothing; False when it cannot be resized (a memory-mapped file's)."""
    try:
        s.resize_(0)
    except RuntimeError:
        return False
    return True


class SleepingWeights:
    """The weights of one runner while it sleeps: what each freed storage held."""

    def __init__(self, current: dict[str, torch.UntypedStorage],
                 built: dict[str, torch.UntypedStorage], device: torch.device,
                 level: int) -> None:
        on_cpu = device.type == "cpu"
        built_keys = {s.data_ptr(): key for key, s in built.items()}
        self.level = level
        self.built = built
        # (storage, bytes, host copy, its name among the loader's storages or None);
        # storages of the loader's weights dropped at level 2
        self.offloaded: list[tuple[torch.UntypedStorage, int, torch.Tensor, str | None]] = []
        self.dropped: dict[str, tuple[torch.UntypedStorage, int]] = {}
        if level == 2:
            self._drop_built()
        if on_cpu:  # level 1 on the host: the weights already are where they would go
            return
        for s in current.values():
            key = built_keys.get(s.data_ptr())
            if key is not None and level == 2:
                continue
            n = s.nbytes()
            if n == 0:
                continue
            host = torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            host.copy_(_as_bytes(s))
            if _free(s):
                self.offloaded.append((s, n, host, key))

    def _drop_built(self) -> None:
        for key, s in self.built.items():
            n = s.nbytes()
            if key not in self.dropped and n and _free(s):
                self.dropped[key] = (s, n)

    def deepen(self) -> None:
        """A level-2 sleep while asleep at level 1: the host copies of the loader's weights
        go too (wake-up builds them again); other tensors' copies stay."""
        if self.level == 2:
            return
        self.level = 2
        kept = []
        for s, n, host, key in self.offloaded:
            if key is None:
                kept.append((s, n, host, key))
            else:
                self.dropped[key] = (s, n)
        self.offloaded = kept
        self._drop_built()  # on a CPU device level 1 left them in place

    @property
    def nbytes_freed(self) -> int:
        return (sum(n for _, n, _, _ in self.offloaded)
                + sum(n for _, n in self.dropped.values()))

    def restore(self, rebuild: Callable[[], dict[str, torch.UntypedStorage]]) -> None:
        """Grow every storage back and fill it: from its host copy, or (level 2) from a
        fresh build's storage of the same name. ``rebuild`` is only called at level 2."""
        for s, n, host, _ in self.offloaded:
            s.resize_(n)
            _as_bytes(s).copy_(host)
        self.offloaded = []
        if not self.dropped:
            return
        fresh = rebuild()
        missing = [k for k, (_, n) in self.dropped.items()
                   if k not in fresh or fresh[k].nbytes() != n]
        if missing:
            raise RuntimeError(f"sleep level 2: the model built again does not match the one "
                               f"loaded at start ({', '.join(missing[:3])}); restart the engine")
        for key, (s, n) in self.dropped.items():
            src = fresh.pop(key)
            s.resize_(n)
            _as_bytes(s).copy_(_as_bytes(src))
            with contextlib.suppress(RuntimeError):
                src.resize_(0)  # the fresh copy goes as soon as it is copied: peak ~1 model
        self.dropped = {}
