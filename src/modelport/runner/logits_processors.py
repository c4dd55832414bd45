"""The engine's custom logits processors (modelport/logits_processor.py) on the sampler's rows.

The runner has no persistent batch: each step's sampling rows come in the scheduler's order,
which may differ from the last step's. So the processors' view of the batch is kept here (the
request id at each row index, as last told), and each step's change is told as one
BatchUpdate: new requests added at free indices (their own row where it is free), the
requests that left removed, then moves that put every request at its row of this step's
logits. A request that skips a step (a prefill chunk samples nothing) leaves and comes back
as added: its processors rebuild its state from its params and token lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from modelport.logits_processor import AddedRequest, BatchUpdate, MoveDirectionality


def batch_update(
    old: Sequence[str], new: Sequence[str], info: Callable[[int], tuple[Any, list, list]]
) -> BatchUpdate | None:
    """The BatchUpdate taking row order ``old`` (request ids) to ``new``; None when they are
    equal. ``info(j)``: (params, prompt ids, output ids) of the request at new row j. Indices
    stay below max(len(old), len(new))."""
    if list(old) == list(new):
        return None
    new_pos = {rid: j for j, rid in enumerate(new)}
    size = max(len(old), len(new))
    slots: list[str | None] = [rid if rid in new_pos else None for rid in old]
    slots += [None] * (size - len(old))
    left = {i for i, rid in enumerate(old) if rid not in new_pos}
    known = set(old)
    fresh = [j for j, rid in enumerate(new) if rid not in known]
    added: list[AddedRequest] = []
    elsewhere = []
    for j in fresh:  # at its own row when that index is free: no move needed
        if slots[j] is None:
            slots[j] = new[j]
            added.append((j, *info(j)))
        else:
            elsewhere.append(j)
    free = iter([i for i in range(size) if slots[i] is None])
    for j in elsewhere:
        i = next(free)
        slots[i] = new[j]
        added.append((i, *info(j)))
    removed = sorted(left - {a[0] for a in added})
    where = {rid: i for i, rid in enumerate(slots) if rid is not None}
    moved = []
    for j, rid in enumerate(new):
        k = where[rid]
        if k == j:
            continue
        other = slots[j]
        how = MoveDirectionality.UNIDIRECTIONAL if other is None else MoveDirectionality.SWAP
        moved.append((k, j, how))
        slots[j], slots[k] = rid, other
        where[rid] = j
        if other is not None:
            where[other] = k
    return BatchUpdate(batch_size=len(new), added=added, removed=removed, moved=moved)


class LogitsProcessors:
    """The built processors and the batch order they were last told."""

    def __init__(self, classes: Sequence[type], config: Any, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.processors = [cls(config, device, pin) for cls in classes]
        self.order: list[str] = []
        # whether a greedy row's token may differ from the argmax of its (other) logits
        self.changes_argmax = any(not p.is_argmax_invariant() for p in self.processors)

    def update(self, rows: Sequence[Any]) -> None:
        """Tell every processor this step's batch (rows: SamplingRows in logits order)."""
        new = [r.request_id for r in rows]
        update = batch_update(self.order, new, lambda j: (
            rows[j].params, rows[j].prompt_token_ids, rows[j].output_token_ids))
        self.order = new
        for p in self.processors:
            p.update_state(update)

    def apply(self, logits: torch.Tensor, argmax_invariant: bool) -> torch.Tensor:
        """Run the processors of one kind, as vLLM's sampler does: those that may change the
        argmax on the logits before greedy picks (every row), the argmax-invariant ones on
        the temperature-scaled logits of a step that samples, before top-k / top-p."""
        for p in self.processors:
            if p.is_argmax_invariant() == argmax_invariant:
                logits = p.apply(logits)
        return logits
