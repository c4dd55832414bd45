"""Custom logits processors for tests/test_logits_processors.py (importable by name, so the
server's engine process can load them: helpers.logits_processors:TargetToken)."""

from __future__ import annotations

from typing import Any

import torch

from modelport import AdapterLogitsProcessor, BatchUpdate, LogitsProcessor, SamplingParams
from modelport.logits_processor import apply_moves


def _target(params: SamplingParams) -> int | None:
    return (params.extra_args or {}).get("target_token")


class TargetToken(LogitsProcessor):
    """A request with extra_args {"target_token": t} can only generate t."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        t = _target(sampling_params)
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
            raise ValueError(f"target_token must be a token id (an integer >= 0), got {t!r}")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.targets: dict[int, int] = {}
        self.vocab = vllm_config.model_config.vocab_size

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index, params, _, _ in batch_update.added:
            t = _target(params)
            if t is None:
                self.targets.pop(index, None)
            else:
                self.targets[index] = t
        for index in batch_update.removed:
            self.targets.pop(index, None)
        apply_moves(self.targets, batch_update.moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, t in self.targets.items():
            logits[index, :t] = float("-inf")
            logits[index, t + 1:] = float("-inf")
        return logits


class Recorder(LogitsProcessor):
    """Records each update_state (class-level: the offline engine runs in this process), and
    keeps its own index -> tag map (extra_args "tag"), snapshotted at each apply."""

    log: list[tuple[str, Any]] = []

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.tags: dict[int, str] = {}
        Recorder.log = []

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            Recorder.log.append(("update", None))
            return
        Recorder.log.append(("update", batch_update))
        for index, params, _, _ in batch_update.added:
            self.tags[index] = (params.extra_args or {})["tag"]
        for index in batch_update.removed:
            self.tags.pop(index, None)
        apply_moves(self.tags, batch_update.moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        Recorder.log.append(("apply", (logits.shape[0], dict(self.tags))))
        return logits


class CountUp(AdapterLogitsProcessor):
    """Per-request callables: {"count_from": k} forces k, k + 1, ... (from the output ids);
    {"echo_prompt": True} replays the prompt (a callable of three arguments)."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        args = params.extra_args or {}
        if "count_from" in args:
            k = args["count_from"]

            def count(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
                out = torch.full_like(row, float("-inf"))
                out[k + len(output_ids)] = 0.0
                return out
            return count
        if args.get("echo_prompt"):
            def echo(prompt_ids: list[int], output_ids: list[int], row: torch.Tensor
                     ) -> torch.Tensor:
                row[:] = float("-inf")
                row[prompt_ids[len(output_ids) % len(prompt_ids)]] = 0.0
                return row
            return echo
        return None


class NotAProcessor:
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class ScaledProbe(LogitsProcessor):
    """Argmax-invariant: keeps each apply's logits (class-level), to show where it runs."""

    seen: list[torch.Tensor] = []

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        ScaledProbe.seen.append(logits.detach().clone())
        return logits
