"""`LLM.get_metrics()`: the engine's counters as vLLM's metric objects, under vLLM's names.

Code written for vLLM's offline API reads them unchanged, e.g. speculative decoding's mean
acceptance length: ``1 + vllm:spec_decode_num_accepted_tokens / vllm:spec_decode_num_drafts``.
The server publishes the same series on /metrics (entrypoints/openai/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelport.engine.messages import SchedulerStats


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A monotonically increasing integer count."""

    value: int


@dataclass
class Gauge(Metric):
    """A value that goes up and down."""

    value: float


@dataclass
class Vector(Metric):
    """Integer counts in order (vllm:spec_decode_num_accepted_tokens_per_pos)."""

    values: list[int]


@dataclass
class RequestCounts:
    """What the offline LLM counts per finished request (the server's stat logger does the
    same on its side)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] | None = None

    def observe(self, num_prompt_tokens: int, finish_reasons: list[str | None],
                num_generated: int) -> None:
        self.prompt_tokens += num_prompt_tokens
        self.generation_tokens += num_generated
        if self.finished is None:
            self.finished = {}
        for reason in finish_reasons:
            if reason is not None:
                self.finished[reason] = self.finished.get(reason, 0) + 1


def snapshot(stats: SchedulerStats, counts: RequestCounts, model_name: str,
             speculative: bool) -> list[Metric]:
    labels = {"model_name": model_name, "engine": "0"}
    out: list[Metric] = [
        Gauge("vllm:num_requests_running", dict(labels), float(stats.num_running)),
        Gauge("vllm:num_requests_waiting", dict(labels), float(stats.num_waiting)),
        Gauge("vllm:kv_cache_usage_perc", dict(labels), float(stats.kv_cache_usage)),
        Counter("vllm:prefix_cache_queries", dict(labels), stats.prefix_cache_queries),
        Counter("vllm:prefix_cache_hits", dict(labels), stats.prefix_cache_hits),
        Counter("vllm:num_preemptions", dict(labels), stats.num_preemptions),
        Counter("vllm:prompt_tokens", dict(labels), counts.prompt_tokens),
        Counter("vllm:generation_tokens", dict(labels), counts.generation_tokens),
    ]
    for reason in ("stop", "length", "abort"):
        out.append(Counter("vllm:request_success", {**labels, "finished_reason": reason},
                           (counts.finished or {}).get(reason, 0)))
    if speculative:  # as vLLM: these series exist only with speculative decoding on
        out += [
            Counter("vllm:spec_decode_num_drafts", dict(labels), stats.spec_num_drafts),
            Counter("vllm:spec_decode_num_draft_tokens", dict(labels),
                    stats.spec_num_draft_tokens),
            Counter("vllm:spec_decode_num_accepted_tokens", dict(labels),
                    stats.spec_num_accepted_tokens),
            Vector("vllm:spec_decode_num_accepted_tokens_per_pos", dict(labels),
                   list(stats.spec_num_accepted_per_pos)),
        ]
    return out
