"""Prometheus metrics for the LLM server, named `modelport:...` like vLLM's `vllm:...` (or
`vllm:...` themselves with `--metrics-prefix vllm`).

Each server owns its own CollectorRegistry so two apps in one process (tests, or several
frontends) never collide on names. Engine-side gauges come from the SchedulerStats the core
attaches to every step; latencies are measured here, in the server process, from the moment
a request arrived over HTTP, which is what a client experiences.

As vLLM v1's, the per-engine series are labelled `model_name` and `engine`: the engine core's
index ("0"; with --data-parallel-size N, "0".."N-1", each replica's gauges and counters from
its own stats, and each request's series under the replica that ran it).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modelport.engine.messages import SchedulerStats

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's buckets for the tokens of one engine step
_STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def buckets_125(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50 ... up to `limit` (vLLM's buckets for per-request token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10

CONTENT_TYPE = CONTENT_TYPE_LATEST
METRIC_PREFIXES = ("modelport", "vllm")


class ServerMetrics:
    """All series of one served model; methods are cheap enough to call per token batch."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 prefix: str = "modelport", max_loras: int | None = None,
                 max_model_len: int = 20000, cache_info: dict[str, Any] | None = None,
                 num_engines: int = 1) -> None:
        """prefix: the series' namespace; "vllm" gives vLLM's names (`vllm:num_requests_running`
        ...) for dashboards built on them (`--metrics-prefix vllm`). max_loras: the server's
        --max-loras when it runs with --enable-lora (None: no LoRA series). max_model_len:
        the top of the max_tokens / generated-tokens buckets. cache_info: the KV cache's
        settings, published as vLLM's cache_config_info labels. num_engines: the engine cores
        (data-parallel replicas) whose series are made at start-up, engine "0" up."""
        if prefix not in METRIC_PREFIXES:
            raise ValueError(f"metrics prefix must be one of {METRIC_PREFIXES}, got {prefix!r}")
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name", "engine"]
        self._model = model_name
        self._engines = [str(i) for i in range(num_engines)]

        def hist(name: str, doc: str, buckets: tuple = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        self.ttft = hist(f"{prefix}:time_to_first_token_seconds", "Time to first token.")
        self.itl = hist(f"{prefix}:inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = hist(f"{prefix}:e2e_request_latency_seconds", "End-to-end request latency.")
        # vLLM's per-request TPOT: (last token - first token) / (generated tokens - 1), 0 for
        # a request of one token (time_per_output_token_seconds until vLLM 0.11)
        self.tpot = hist(
            f"{prefix}:request_time_per_output_token_seconds",
            "Time per output token, averaged over each request.",
            TPOT_BUCKETS,
        )
        self.queue = hist(f"{prefix}:request_queue_time_seconds", "Time waiting to be scheduled.")
        # vLLM's phases of a finished request: prefill (first scheduled -> first token),
        # decode (first token -> last), inference (both)
        self.prefill_time = hist(
            f"{prefix}:request_prefill_time_seconds", "Time in the prefill phase per request.")
        self.decode_time = hist(
            f"{prefix}:request_decode_time_seconds", "Time in the decode phase per request.")
        self.inference_time = hist(
            f"{prefix}:request_inference_time_seconds",
            "Time running (prefill + decode) per request.",
        )
        self.prompt_len = hist(
            f"{prefix}:request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS
        )
        self.gen_len = hist(
            f"{prefix}:request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS
        )
        # vLLM's per-request parameters, once a request (all its n sequences) is done
        self.params_n = hist(f"{prefix}:request_params_n", "The n parameter of each request.",
                             N_BUCKETS)
        self.params_max_tokens = hist(
            f"{prefix}:request_params_max_tokens", "The max_tokens parameter of each request.",
            buckets_125(max_model_len))
        self.max_generated = hist(
            f"{prefix}:request_max_num_generation_tokens",
            "The most tokens one sequence of each request generated.", buckets_125(max_model_len))
        self.step_tokens = hist(f"{prefix}:iteration_tokens_total",
                                "Histogram of number of tokens per engine_step.",
                                _STEP_TOKEN_BUCKETS)
        if cache_info:  # vLLM's info series: the settings as labels, value 1, no model_name
            info = Gauge(f"{prefix}:cache_config_info", "Information of the KV cache config.",
                         sorted(cache_info), registry=r)
            info.labels(**{k: str(v) for k, v in cache_info.items()}).set(1)
        self.running = Gauge(
            f"{prefix}:num_requests_running", "Requests running.", labels, registry=r
        )
        self.waiting = Gauge(
            f"{prefix}:num_requests_waiting", "Requests waiting.", labels, registry=r
        )
        self.kv_usage = Gauge(
            f"{prefix}:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0-1).",
            labels,
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            f"{prefix}:prefix_cache_hit_rate",
            "Prefix cache hits / queries (tokens, 0-1).",
            labels,
            registry=r,
        )
        self.prefix_queries = Counter(
            f"{prefix}:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            registry=r,
        )
        self.prefix_hits = Counter(
            f"{prefix}:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            labels,
            registry=r,
        )
        self.preemptions = Counter(
            f"{prefix}:num_preemptions",
            "Requests preempted (recomputed later).",
            labels,
            registry=r,
        )
        self.spec_steps = Counter(
            f"{prefix}:spec_decode_num_drafts",
            "Speculative decoding: steps that checked draft tokens.",
            labels,
            registry=r,
        )
        self.spec_accepted_per_pos = Counter(
            f"{prefix}:spec_decode_num_accepted_tokens_per_pos",
            "Speculative decoding: draft tokens accepted, by position in the draft.",
            [*labels, "position"],
            registry=r,
        )
        self.spec_drafts = Counter(
            f"{prefix}:spec_decode_num_draft_tokens",
            "Speculative decoding: draft tokens proposed.",
            labels,
            registry=r,
        )
        self.spec_accepted = Counter(
            f"{prefix}:spec_decode_num_accepted_tokens",
            "Speculative decoding: draft tokens the model accepted.",
            labels,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{prefix}:prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            f"{prefix}:generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.success = Counter(
            f"{prefix}:request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        # the whole server's: a request refused at admission never reached an engine
        self.rejected = Counter(
            f"{prefix}:request_rejected",
            "Requests refused because the waiting queue was full.",
            ["model_name"],
            registry=r,
        )
        for engine in self._engines:
            for reason in ("stop", "length", "abort"):
                self.success.labels(model_name, engine, reason)
        # vLLM's LoRA gauge (what LoRA-aware routers such as the Gateway API inference
        # extension read): one series per (max_lora, waiting, running) label set, the
        # adapters' names comma-joined, its value the time of the step that saw them; no
        # model_name label, as in vLLM
        self.lora_info: Gauge | None = None
        self._max_lora = str(max_loras)
        if max_loras is not None:
            self.lora_info = Gauge(
                f"{prefix}:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=r,
            )
            self.lora_info.labels(self._max_lora, "", "").set_to_current_time()
        # each engine's latest stats: its cumulative counters grow by the difference
        self._last = [SchedulerStats() for _ in self._engines]
        # per engine, metric -> its child for (model, engine): labels() costs several
        # microseconds a call, and the per-token observations below run for every streamed token
        self._children: list[dict[Any, Any]] = [{} for _ in self._engines]
        # vLLM makes its per-engine series when it starts, so a fresh server already shows
        # num_requests_waiting 0, prompt_tokens_total 0, empty histograms ... for every engine
        # (an autoscaler's or a dashboard's query gets 0, not "no data"); speculative
        # decoding's stay unmade
        for engine in range(num_engines):
            for metric in (self.ttft, self.itl, self.e2e, self.tpot, self.queue,
                           self.prefill_time, self.decode_time, self.inference_time,
                           self.prompt_len, self.gen_len, self.params_n, self.params_max_tokens,
                           self.max_generated, self.step_tokens,
                           self.running, self.waiting, self.kv_usage,
                           self.prefix_queries, self.prefix_hits, self.preemptions,
                           self.prompt_tokens, self.generation_tokens):
                self._of(metric, engine)

    def _of(self, metric: Any, engine: int = 0) -> Any:
        """metric.labels(model, engine), made on first use (as labels() makes it) and kept."""
        children = self._children[engine]
        child = children.get(metric)
        if child is None:
            child = children[metric] = metric.labels(self._model, self._engines[engine])
        return child

    # -- engine stats (once per step)

    def observe_stats(self, s: SchedulerStats, engine: int = 0,
                      server_stats: SchedulerStats | None = None) -> None:
        """s: engine `engine`'s latest stats; server_stats: the whole server's (all the
        data-parallel replicas' merged; None: s is), for the series that are not per engine
        (lora_requests_info)."""
        m, e = self._model, self._engines[engine]
        last = self._last[engine]

        def of(metric: Any) -> Any:
            return self._of(metric, engine)

        of(self.running).set(s.num_running)
        of(self.waiting).set(s.num_waiting)
        of(self.kv_usage).set(s.kv_cache_usage)
        for counter, now, before in (
            (self.prefix_queries, s.prefix_cache_queries, last.prefix_cache_queries),
            (self.prefix_hits, s.prefix_cache_hits, last.prefix_cache_hits),
            (self.preemptions, s.num_preemptions, last.num_preemptions),
            (self.spec_steps, s.spec_num_drafts, last.spec_num_drafts),
            (self.spec_drafts, s.spec_num_draft_tokens, last.spec_num_draft_tokens),
            (self.spec_accepted, s.spec_num_accepted_tokens, last.spec_num_accepted_tokens),
        ):
            if now > before:
                of(counter).inc(now - before)
        before_pos = last.spec_num_accepted_per_pos
        for pos, now in enumerate(s.spec_num_accepted_per_pos):
            before = before_pos[pos] if pos < len(before_pos) else 0
            if now > before:
                self.spec_accepted_per_pos.labels(m, e, str(pos)).inc(now - before)
        if s.prefix_cache_queries:
            of(self.prefix_hit_rate).set(s.prefix_cache_hits / s.prefix_cache_queries)
        if self.lora_info is not None:
            whole = s if server_stats is None else server_stats
            self.lora_info.labels(
                self._max_lora,
                ",".join(whole.waiting_lora_adapters),
                ",".join(whole.running_lora_adapters),
            ).set_to_current_time()
        self._last[engine] = s

    def observe_step_tokens(self, num_tokens: int, engine: int = 0) -> None:
        """One step of engine `engine` ran num_tokens tokens (prompt chunks and decodes
        together)."""
        self._of(self.step_tokens, engine).observe(num_tokens)

    # -- per request (server clock), under the engine that ran it

    def observe_first_token(self, ttft: float, queue_time: float | None,
                            engine: int = 0) -> None:
        self._of(self.ttft, engine).observe(ttft)
        if queue_time is not None and queue_time >= 0:
            self._of(self.queue, engine).observe(queue_time)

    def observe_tokens(self, n_new: int, gap: float | None, engine: int = 0) -> None:
        """n_new tokens arrived together, `gap` seconds after the previous ones."""
        self._of(self.generation_tokens, engine).inc(n_new)
        if gap is not None and n_new > 0:
            per = gap / n_new
            itl = self._of(self.itl, engine)
            for _ in range(n_new):
                itl.observe(per)

    def observe_finished(
        self, finish_reason: str, e2e: float, prompt_tokens: int, generation_tokens: int,
        decode_time: float = 0.0, prefill_time: float | None = None, engine: int = 0,
    ) -> None:
        """decode_time: seconds from the request's first output token to its last;
        prefill_time: from its first scheduling to its first token (None: not known)."""

        def of(metric: Any) -> Any:
            return self._of(metric, engine)

        self.success.labels(self._model, self._engines[engine], finish_reason).inc()
        of(self.e2e).observe(e2e)
        of(self.decode_time).observe(decode_time)
        if prefill_time is not None:
            of(self.prefill_time).observe(prefill_time)
            of(self.inference_time).observe(prefill_time + decode_time)
        of(self.tpot).observe(
            decode_time / (generation_tokens - 1) if generation_tokens > 1 else 0.0)
        of(self.prompt_tokens).inc(prompt_tokens)
        of(self.prompt_len).observe(prompt_tokens)
        of(self.gen_len).observe(generation_tokens)

    def observe_rejected(self) -> None:
        self.rejected.labels(self._model).inc()

    def observe_request(self, n: int, max_tokens: int | None, max_generated: int,
                        engine: int = 0) -> None:
        """A request is done (finished or aborted): its n, its max_tokens (when it set one)
        and the most tokens one of its sequences generated."""
        self._of(self.params_n, engine).observe(n)
        if max_tokens is not None:
            self._of(self.params_max_tokens, engine).observe(max_tokens)
        self._of(self.max_generated, engine).observe(max_generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)
