"""Custom logits processors: the interface users write against (vLLM V1's contract).

A processor is built once per engine, where sampling runs (the engine core's rank-0 runner),
as ``cls(vllm_config, device, is_pin_memory)``; ``vllm_config`` is the EngineConfig. Every
step the runner first tells it how the batch changed (``update_state``: requests added at,
removed from and moved between row indices), then hands it the batch's logits rows
(``apply``). A processor keeps per-request state keyed by row index, so it works on the whole
batch at once instead of one Python call per request; per-request arguments come in
``SamplingParams.extra_args`` (the OpenAI field ``vllm_xargs``), checked at admission by the
optional classmethod ``validate_params`` (a ValueError there refuses the request: a 400).

``AdapterLogitsProcessor`` wraps V0-style per-request callables for processors migrated from
vLLM V0: the subclass returns one callable per request, called per row.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from modelport.sampling_params import SamplingParams


class MoveDirectionality(Enum):
    """UNIDIRECTIONAL: a's request goes to b (b's is dropped); SWAP: a and b trade."""

    UNIDIRECTIONAL = 0
    SWAP = 1


# (index, params, prompt token ids, output token ids): the output list is the request's own,
# appended to as it generates, so a processor may keep it and read it each step
AddedRequest = tuple[int, "SamplingParams", list[int], list[int]]
MovedRequest = tuple[int, int, MoveDirectionality]


@dataclass
class BatchUpdate:
    """How the batch changed since the last ``update_state``. Apply in this order: every
    ``added`` (a request now at index: replaces whatever state that index had), then every
    ``removed`` index, then each ``moved`` (a, b, directionality) in turn. After that, rows
    0 .. batch_size - 1 of the next ``apply`` are exactly the batch's requests."""

    batch_size: int
    added: Sequence[AddedRequest] = field(default_factory=list)
    removed: Sequence[int] = field(default_factory=list)
    moved: Sequence[MovedRequest] = field(default_factory=list)


class LogitsProcessor(ABC):
    """A batch-level logits processor (vLLM V1's interface)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ValueError for a request whose arguments this processor refuses."""
        return None

    @abstractmethod
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        ...

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True when apply() never changes a row's argmax: greedy rows may skip it."""

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called once a step before apply(); None when the batch did not change."""

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch_size, vocab] logits in, logits out (in place or a new tensor)."""


RequestLogitsProcessor = Callable[..., "torch.Tensor"]


class AdapterLogitsProcessor(LogitsProcessor):
    """Per-request callables as a batch processor. A subclass implements
    ``is_argmax_invariant`` and ``new_req_logits_processor(params)``, which returns the
    request's callable, ``(output_ids, logits_row) -> logits_row`` or
    ``(prompt_ids, output_ids, logits_row) -> logits_row``, or None where the request needs
    none. A subclass's own ``__init__`` must call this one."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.vllm_config = vllm_config
        self.device = device
        self.is_pin_memory = is_pin_memory
        # row index -> (callable, prompt ids or None when it takes two arguments, output ids)
        self._rows: dict[int, tuple[RequestLogitsProcessor, list[int] | None, list[int]]] = {}

    @abstractmethod
    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        """The request's callable, or None."""

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index, params, prompt_ids, output_ids in batch_update.added:
            fn = self.new_req_logits_processor(params)
            if fn is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = (fn, prompt_ids if _arity(fn) == 3 else None, output_ids)
        for index in batch_update.removed:
            self._rows.pop(index, None)
        apply_moves(self._rows, batch_update.moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (fn, prompt_ids, output_ids) in self._rows.items():
            args = (output_ids,) if prompt_ids is None else (prompt_ids, output_ids)
            logits[index] = fn(*args, logits[index])
        return logits


def apply_moves(state: dict[int, Any], moved: Sequence[MovedRequest]) -> None:
    """BatchUpdate.moved applied to a processor's index -> state dict (in order)."""
    for a, b, how in moved:
        sa, sb = state.pop(a, None), state.pop(b, None)
        if sa is not None:
            state[b] = sa
        if sb is not None and how == MoveDirectionality.SWAP:
            state[a] = sb


def _arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return 3 if len(positional) >= 3 else 2


# -- loading -------------------------------------------------------------------------------
def _import_name(name: str) -> Any:
    """``pkg.mod:Class`` or ``pkg.mod.Class``."""
    if ":" in name:
        module, _, attr = name.partition(":")
    else:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise ValueError(f"logits processor {name!r}: give a fully-qualified name, "
                         "'package.module:Class' or 'package.module.Class'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"logits processor {name!r}: cannot import {module!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"logits processor {name!r}: module {module!r} has no "
                             f"{attr!r}") from None
    return obj


def is_logits_processor_class(obj: Any) -> bool:
    """A LogitsProcessor subclass, or a class with its methods (one written against
    vLLM's base class)."""
    if not inspect.isclass(obj) or inspect.isabstract(obj):
        return False
    if issubclass(obj, LogitsProcessor):
        return True
    return all(callable(getattr(obj, m, None))
               for m in ("is_argmax_invariant", "update_state", "apply"))


def load_logits_processors(specs: Sequence[type | str] | None) -> tuple[type, ...]:
    """The processor classes for classes or fully-qualified names; ValueError naming the one
    that is unknown or no processor class."""
    out = []
    for spec in specs or ():
        cls = _import_name(spec) if isinstance(spec, str) else spec
        if not is_logits_processor_class(cls):
            shown = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
            raise ValueError(f"logits processor {shown!r} is not a logits processor class (a "
                             "concrete subclass of modelport.logits_processor.LogitsProcessor "
                             "with is_argmax_invariant, update_state and apply)")
        out.append(cls)
    return tuple(out)


def validate_request(classes: Sequence[type], params: SamplingParams) -> None:
    """Each processor's validate_params on a request (a ValueError refuses it)."""
    for cls in classes:
        check = getattr(cls, "validate_params", None)
        if check is not None:
            check(params)
