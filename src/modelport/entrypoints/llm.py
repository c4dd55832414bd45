"""The offline API: `LLM(...)` and `llm.generate(...)` / `llm.chat(...)`, as in vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from modelport.beam_search import (
    BeamSearcher,
    BeamSearchOutput,
    beam_logprobs_error,
)
from modelport.engine.arg_utils import EngineArgs
from modelport.engine.llm_engine import LLMEngine
from modelport.entrypoints.vllm_engine_flags import llm_kwargs
from modelport.frontend.processor import check_continue_final
from modelport.frontend.prompts import PromptInput, is_token_ids
from modelport.frontend.tokenizer import Tokenizer
from modelport.lora.request import LoRARequest
from modelport.metrics import Metric, RequestCounts, snapshot
from modelport.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from modelport.pooling_params import PoolingParams
from modelport.sampling_params import BeamSearchParams, SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """Generate from a model in this process.

    >>> llm = LLM()   # the embedded SmolLM2-135M-Instruct on CPU
    >>> llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.90,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        load_format: str = "auto",
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool | None = None,
        block_size: int = 16,
        seed: int | None = 0,
        quantization: str | None = None,
        device: str = "auto",
        kv_cache_dtype: str = "auto",
        async_scheduling: bool | None = None,
        speculative_config: dict[str, Any] | None = None,
        max_logprobs: int = 20,
        data_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        trust_remote_code: bool = False,
        hf_overrides: dict[str, Any] | None = None,
        disable_log_stats: bool = True,
        runner: str = "auto",
        convert: str = "auto",
        task: str | None = None,
        pooler_config: dict[str, Any] | None = None,
        override_pooler_config: dict[str, Any] | None = None,
        reasoning_parser: str | None = None,
        structured_outputs_config: dict[str, Any] | None = None,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
        scheduling_policy: str = "fcfs",
        generation_config: str = "auto",
        override_generation_config: dict[str, Any] | None = None,
        disable_sliding_window: bool = False,
        max_num_partial_prefills: int = 1,
        max_long_partial_prefills: int = 1,
        long_prefill_token_threshold: int = 0,
        enable_sleep_mode: bool = False,
        logits_processors: list[str | type] | None = None,
        cuda_graph_sizes: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        """vLLM's arguments. ``trust_remote_code`` changes nothing (no model code is ever
        loaded from a checkpoint: the architectures are built in), and ``get_metrics()``
        answers whatever ``disable_log_stats`` says. ``generation_config`` ("auto": the
        model folder's generation_config.json; "vllm": none; or a folder) and
        ``override_generation_config`` give the defaults of
        :meth:`get_default_sampling_params`, which ``generate`` / ``chat`` use when given no
        SamplingParams. ``logits_processors``: custom logits processor classes or their
        fully-qualified names (modelport/logits_processor.py); a request's arguments for them
        go in ``SamplingParams.extra_args``. vLLM's other engine arguments are taken as its
        `serve` flags are (entrypoints/vllm_engine_flags.py): ``compilation_config=0`` runs
        eagerly, ``rope_scaling`` / ``rope_theta`` join ``hf_overrides``, one that asks for
        what modelport does not do (``cpu_offload_gb=4``) is a ValueError naming it, and a
        name vLLM does not take either is a TypeError."""
        if "kv_cache_memory_bytes" in kwargs:  # vLLM's name
            if kv_cache_memory is not None:
                raise TypeError("give kv_cache_memory or kv_cache_memory_bytes, not both")
            kv_cache_memory = kwargs.pop("kv_cache_memory_bytes")
        served = kwargs.pop("served_model_name", None)  # vLLM's: a name or names
        if isinstance(served, (list, tuple)):
            served = served[0] if served else None
        # vLLM's other engine arguments: applied, accepted, or refused naming the argument
        # (a ValueError); a name vLLM does not take either is a TypeError, as in vLLM
        extra = llm_kwargs(kwargs, own={
            "enforce_eager": enforce_eager, "cuda_graph_sizes": cuda_graph_sizes,
            "hf_overrides": hf_overrides, "structured_outputs_config": structured_outputs_config,
            "reasoning_parser": reasoning_parser, "data_parallel_size": data_parallel_size,
            "load_format": load_format,
            "quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
        })
        if data_parallel_size != 1:
            raise ValueError(
                f"LLM(data_parallel_size={data_parallel_size}) is not supported (nor in vLLM's "
                "single-process LLM): run one LLM per process, each on its own devices, and "
                "split the prompts between them, or serve the replicas behind one endpoint "
                "with `modelport serve --data-parallel-size N`"
            )
        args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            enable_expert_parallel=enable_expert_parallel, load_format=load_format,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            usage_context="offline",
            enable_chunked_prefill=enable_chunked_prefill,
            block_size=block_size, seed=seed, quantization=quantization, device=device,
            kv_cache_dtype=kv_cache_dtype, async_scheduling=async_scheduling,
            speculative_config=speculative_config, max_logprobs=max_logprobs,
            runner=runner, convert=convert, task=task, pooler_config=pooler_config,
            hf_overrides=hf_overrides,
            override_pooler_config=override_pooler_config,
            reasoning_parser=reasoning_parser,
            structured_outputs_config=structured_outputs_config,
            enable_lora=enable_lora, max_loras=max_loras, max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras, scheduling_policy=scheduling_policy,
            generation_config=generation_config,
            override_generation_config=override_generation_config,
            disable_sliding_window=disable_sliding_window,
            max_num_partial_prefills=max_num_partial_prefills,
            max_long_partial_prefills=max_long_partial_prefills,
            long_prefill_token_threshold=long_prefill_token_threshold,
            cuda_graph_sizes=cuda_graph_sizes,
            enable_sleep_mode=enable_sleep_mode,
            logits_processors=logits_processors,
            served_model_name=served,
        )
        for k, v in extra.items():  # vLLM's arguments mapped onto EngineArgs' fields
            setattr(args, k, v)
        self.llm_engine = LLMEngine.from_engine_args(args)
        self._counter = itertools.count()
        self._request_counts = RequestCounts()

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (``LLM(enable_sleep_mode=True)``): level 1 moves the weights to
        host memory and frees the KV cache; level 2 frees both. The prefix cache is reset.
        Unlike vLLM, ``wake_up`` after level 2 loads the weights again from the model's
        checkpoint (or the dummy load format), so generation works at once; weights updated
        in place before a level-2 sleep are lost (use level 1 to keep them)."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what ``sleep`` freed: ``tags`` among "weights" and "kv_cache" (None: both),
        so the weights can come back (and be updated) before the KV cache is allocated."""
        self.llm_engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.llm_engine.is_sleeping()

    def start_profile(self) -> None:
        """vLLM's torch profiler: with MODELPORT_TORCH_PROFILER_DIR (or vLLM's
        VLLM_TORCH_PROFILER_DIR) set before the LLM is made, record what runs from now until
        ``stop_profile``, which writes a gzipped Chrome trace (``*.pt.trace.json.gz``, one per
        process running the model: each tensor-parallel rank) into that directory.
        TorchProfilerError (a RuntimeError) when the variable was not set or a profile is
        already running."""
        self.llm_engine.start_profile()

    def stop_profile(self) -> None:
        """Stop the profile ``start_profile`` began and write its traces; TorchProfilerError
        when none is running."""
        self.llm_engine.stop_profile()

    def get_metrics(self) -> list[Metric]:
        """The engine's counters as vLLM's metric objects (Counter / Gauge / Vector) under
        vLLM's names: ``vllm:num_requests_running``, ``vllm:prefix_cache_hits``,
        ``vllm:generation_tokens``, and with speculative decoding
        ``vllm:spec_decode_num_drafts`` / ``_num_draft_tokens`` / ``_num_accepted_tokens`` /
        ``_num_accepted_tokens_per_pos``."""
        engine = self.llm_engine
        return snapshot(engine.core.get_stats(), self._request_counts,
                        engine.config.served_model_name,
                        speculative=engine.config.speculative_config is not None)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: a new SamplingParams whose fields are the generation config's sampling
        defaults (temperature, top_p, top_k, min_p, repetition_penalty; max_new_tokens as
        max_tokens) where it gives them, SamplingParams' own defaults elsewhere."""
        return SamplingParams(**self.llm_engine.config.default_sampling_params)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: drop the prefix cache (e.g. between benchmark runs, so the next run does
        not find its prompts cached); False if it could not (requests still hold blocks)."""
        return self.llm_engine.reset_prefix_cache()

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer: it answers as the Hugging Face tokenizer does, as vLLM's
        (see frontend/tokenizer.py for the members whose defaults are the engine's)."""
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Invalid input raises ValueError.

        A prompt is a string, a list of token ids, ``{"prompt": text}`` or
        ``{"prompt_token_ids": ids}`` (vLLM's TextPrompt / TokensPrompt); give one, or a list
        of them in any mix. ``lora_request`` (with ``LLM(enable_lora=True)``): one adapter
        for every prompt, or one (or None) per prompt. ``priority``: one int per prompt,
        lower first (needs ``LLM(scheduling_policy="priority")`` unless all are 0).
        """
        self._check_generative("LLM.generate()")
        items = _normalize_prompts(prompts, prompt_token_ids)
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"got {len(priority)} priorities for {len(items)} prompts; pass "
                             "one each")
        return self._run(items, sampling_params, use_tqdm, add_special_tokens=True,
                         lora_request=lora_request, priority=priority)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template_content_format: str = "auto",
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Each conversation through the model's chat template (or ``chat_template``, the
        Jinja text to use instead), then generated as vLLM's LLM.chat. ``tools`` (OpenAI
        tool definitions) reach a tool-aware template; earlier assistant tool calls'
        JSON-string arguments reach it as objects, as vLLM gives them.
        ``chat_template_content_format`` (vLLM's): a message's content reaches the template
        as one string ("string"), as a list of ``{"type": "text", "text": ...}`` parts
        ("openai"), or as the template reads it ("auto": parts for a template that loops
        over ``message['content']``). ``continue_final_message`` (with
        ``add_generation_prompt=False``) leaves the final assistant message open for the
        model to go on writing."""
        from modelport.entrypoints.openai.tool_parsers import history_for_template

        self._check_generative("LLM.chat()")
        convs: Sequence[Conversation]
        if messages and isinstance(messages[0], dict):
            convs = [messages]  # type: ignore[list-item]
        else:
            convs = messages  # type: ignore[assignment]
        for conv in convs:
            _check_text_only(conv)
            if continue_final_message:  # a ValueError, as vLLM's
                check_continue_final(conv[-1].get("role") if conv else None,
                                     add_generation_prompt)
        tok = self.llm_engine.tokenizer
        kw = dict(chat_template_kwargs or {})
        if continue_final_message:
            kw["continue_final_message"] = True
        if tools is not None:
            kw["tools"] = tools
        if chat_template is not None:
            kw["chat_template"] = chat_template
        kw["chat_template_content_format"] = chat_template_content_format
        prompts = [
            tok.apply_chat_template(history_for_template(list(c)),
                                    add_generation_prompt=add_generation_prompt, **kw)
            for c in convs
        ]
        return self._run(prompts, sampling_params, use_tqdm, add_special_tokens=False,
                         lora_request=lora_request)

    def _run(self, items: list, sampling_params, use_tqdm: bool, add_special_tokens: bool,
             lora_request: Any = None, priority: Sequence[int] | None = None
             ) -> list[RequestOutput]:
        if sampling_params is None:  # vLLM: the generation config's defaults
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(items)} prompts; pass one or one each"
                )
        engine = self.llm_engine
        loras = _per_prompt_loras(lora_request, len(items))
        if any(lr is not None for lr in loras):  # paired with the prompts (zip in _drive)
            params = list(zip(params, loras))

        prios = iter(priority) if priority is not None else None  # add() runs in prompt order

        def add(rid: str, item: Any, p: Any) -> None:
            lr = None
            if isinstance(p, tuple):
                p, lr = p
            engine.add_request(rid, item, p, add_special_tokens=add_special_tokens,
                               lora_request=lr, priority=next(prios) if prios else 0,
                               output_kind="final")  # whatever p.output_kind says, as vLLM

        def observe(out: RequestOutput) -> None:
            self._request_counts.observe(
                len(out.prompt_token_ids), [o.finish_reason for o in out.outputs],
                sum(len(o.token_ids) for o in out.outputs))

        return self._drive(items, params, add, use_tqdm, observe)

    def _drive(self, items: list, params: list, add: Any, use_tqdm: bool,
               observe: Any = None) -> list:
        """Submit each (item, params) pair through ``add(request_id, item, params)``, step
        the engine until every one finished, and return their outputs in order; on any
        error (e.g. a grammar that failed to compile) this call's other requests are
        aborted before it propagates."""
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for item, p in zip(items, params):
                rid = str(next(self._counter))
                add(rid, item, p)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            raise
        results: dict[str, Any] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests() or len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if observe is not None:
                            observe(out)
                        bar.update(1)
                if not engine.has_unfinished_requests() and len(results) < len(ids):
                    missing = [r for r in ids if r not in results]
                    raise RuntimeError(f"engine went idle with requests unanswered: {missing}")
        except BaseException:
            engine.abort_request([r for r in ids if r not in results])
            raise
        finally:
            bar.close()
        return [results[r] for r in ids]

    # -- vLLM's pooling APIs (runner="pooling"): embeddings, classification, scoring

    @property
    def runner_type(self) -> str:
        return self.llm_engine.config.runner_type

    def _check_generative(self, api: str) -> None:
        if self.runner_type != "generate":
            raise ValueError(
                f"{api} is only supported for generative models. Try passing "
                "`--runner generate` to use the model as a generative model."
            )

    def encode(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_task: str | None = None,
    ) -> list[PoolingRequestOutput]:
        """One ``PoolingRequestOutput`` per prompt, in order: ``.outputs.data`` is the pooled
        vector (a float32 tensor), or for a per-token task (``pooling_task="token_embed"``
        on an embedding model, ``"token_classify"`` on a classifier; BGE-M3's heads:
        models/bge_m3.py) its rows [n, d]. Needs
        ``LLM(..., runner="pooling")``."""
        if self.runner_type != "pooling":
            raise ValueError(
                "LLM.encode() is only supported for pooling models. Try passing "
                "`--runner pooling` to use the model as a pooling model."
            )
        from modelport.pooling_params import POOLING_TASKS

        if pooling_task is not None and pooling_task not in POOLING_TASKS:
            raise ValueError(f"pooling_task {pooling_task!r} is not supported by this model: "
                             f"use one of {', '.join(POOLING_TASKS)}")
        items = _normalize_prompts(prompts, None)
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, PoolingParams):
            params = [pooling_params.clone() for _ in items]
        else:
            params = [p.clone() for p in pooling_params]
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} PoolingParams for {len(items)} prompts; "
                                 "pass one or one each")
        for p in params:
            if truncate_prompt_tokens is not None:
                p.truncate_prompt_tokens = truncate_prompt_tokens
            p.task = pooling_task or p.task or "encode"
        return self._drive(items, params, self.llm_engine.add_pooling_request, use_tqdm)

    def embed(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One ``EmbeddingRequestOutput`` per prompt, in order (``.outputs.embedding``: a
        list of floats). Needs ``LLM(..., runner="pooling")`` (or ``convert="embed"``,
        ``task="embed"``): LAST-token pooling, L2-normalized unless pooler_config says else."""
        if self.runner_type != "pooling":
            raise ValueError("Embedding API is not supported by this model. Try converting "
                             "the model using `--convert embed`.")
        outs = self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                           use_tqdm=use_tqdm, pooling_task="embed")
        return [EmbeddingRequestOutput.from_base(o) for o in outs]

    @property
    def _pooling_task(self) -> str | None:
        pooler = self.llm_engine.config.pooler_config
        return pooler.task if pooler is not None else None

    def classify(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ClassificationRequestOutput]:
        """One ``ClassificationRequestOutput`` per prompt, in order (``.outputs.probs``: the
        class probabilities, softmax, or sigmoid for one label; the raw logits with
        ``PoolingParams(use_activation=False)``). Needs a ``*ForSequenceClassification``
        checkpoint with ``runner="pooling"`` (or auto)."""
        from modelport.pooling_params import unsupported_task_message

        if self.runner_type != "pooling" or self._pooling_task != "classify":
            raise ValueError(unsupported_task_message("classify"))
        outs = self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                           use_tqdm=use_tqdm, pooling_task="classify")
        return [ClassificationRequestOutput.from_base(o) for o in outs]

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score: one ``ScoringRequestOutput`` per pair (``.outputs.score``).

        Pairs follow vLLM's 1:1, 1:N and N:N rules. A cross-encoder (a classification model
        with one label) scores the tokenizer's encoding of each pair (sigmoid of the logit;
        ``use_activation=False``: the logit), its token types as the tokenizer gives them,
        and ``truncate_prompt_tokens`` (-1: max_model_len) truncates each pair as
        transformers does ('longest_first'); an embedding model scores by the cosine
        similarity of the two texts' embeddings."""
        from modelport.pooling_params import num_labels
        from modelport.scoring import pair_encoding, pair_truncation, score_pairs

        if self.runner_type != "pooling":
            raise ValueError("Score API is not supported by this model. Try converting the "
                             "model using `--convert embed` or `--convert classify`.")
        pairs = score_pairs(data_1, data_2)
        base = pooling_params if pooling_params is not None else PoolingParams()
        if not isinstance(base, PoolingParams):
            raise ValueError("LLM.score() takes one PoolingParams (for every pair)")
        if self._pooling_task == "classify":
            if num_labels(self.llm_engine.config.model_config.hf_config) != 1:
                raise ValueError("Score API is only enabled for num_labels == 1.")
            tok = self.get_tokenizer()
            # truncated as transformers truncates a pair; token types from the tokenizer
            keep = truncate_prompt_tokens if truncate_prompt_tokens is not None \
                else base.truncate_prompt_tokens
            limit = pair_truncation(keep, self.llm_engine.config.scheduler_config.max_model_len)
            items, params = [], []
            for a, b in pairs:
                ids, type_start = pair_encoding(tok, a, b, limit)
                items.append({"prompt_token_ids": ids})
                p = base.clone()
                p.truncate_prompt_tokens = None
                p.token_type_start = type_start
                params.append(p)
            outs = self.encode(items, params, use_tqdm=use_tqdm, pooling_task="score")
            return [ScoringRequestOutput.from_base(o) for o in outs]
        return self._embedding_score(pairs, base, truncate_prompt_tokens, use_tqdm)

    def _embedding_score(self, pairs: list[tuple[str, str]], params: PoolingParams,
                         truncate_prompt_tokens: int | None, use_tqdm: bool
                         ) -> list[ScoringRequestOutput]:
        from modelport.outputs import ScoringOutput
        from modelport.scoring import cosine

        texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each text once
        outs = self.encode(texts, params, truncate_prompt_tokens=truncate_prompt_tokens,
                           use_tqdm=use_tqdm, pooling_task="embed")
        by_text = dict(zip(texts, outs))
        results = []
        for a, b in pairs:
            ea, eb = by_text[a], by_text[b]
            results.append(ScoringRequestOutput(
                f"{ea.request_id}_{eb.request_id}",
                ScoringOutput(cosine(ea.outputs.data, eb.outputs.data)),
                ea.prompt_token_ids + eb.prompt_token_ids))
        return results

    def reward(self, *args: Any, **kwargs: Any) -> list:
        raise ValueError(_POOLING_ONLY.format(api="LLM.reward()"))

    # -- vLLM's beam search: an outer loop over one-token requests (as vLLM's LLM class)

    def beam_search(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: BeamSearchParams,
        lora_request: Any = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: one ``BeamSearchOutput`` per prompt, in order, whose
        ``sequences`` are its best ``params.beam_width`` beams, best first.

        A prompt is a string, token ids, ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``
        (vLLM's TextPrompt / TokensPrompt). Each step runs every live beam as a one-token
        request asking for ``2 * beam_width`` logprobs (prefix caching makes the re-prefill
        cheap), extends each beam by each candidate and keeps the ``beam_width`` best by
        :func:`~modelport.beam_search.get_beam_search_score`. A beam that generates an
        end-of-sequence token (the tokenizer's, or the model's own end ids) is finished
        ("stop") unless ``ignore_eos``; the others end after ``max_tokens`` tokens or at
        ``max_model_len`` ("length"). As in vLLM, ``tokens`` and ``text`` hold the prompt
        followed by the output (``output_token_ids`` the output alone); ``text`` leaves the
        final EOS out unless ``include_stop_str_in_output``. ``concurrency_limit`` searches
        that many prompts at a time (None: all at once)."""
        self._check_generative("LLM.beam_search()")
        if not isinstance(params, BeamSearchParams):
            raise ValueError(
                "LLM.beam_search() takes a BeamSearchParams (from modelport or "
                f"modelport.sampling_params), got {type(params).__name__}"
            )
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError("LLM.beam_search() takes one LoRARequest (for every prompt)")
        if concurrency_limit is not None and (
                not isinstance(concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be None or an integer >= 1, "
                             f"got {concurrency_limit!r}")
        engine = self.llm_engine
        proc = engine.input_processor
        tok = engine.tokenizer
        width = params.beam_width
        why = beam_logprobs_error(width, proc.max_logprobs)
        if why is not None:
            raise ValueError(f"{why}: use beam_width <= {proc.max_logprobs // 2} or "
                             f"LLM(max_logprobs={2 * width})")
        prompt_ids = [list(proc.prompt_inputs(item, None, add_special_tokens=True)[1])
                      for item in _normalize_prompts(prompts, None)]
        searcher = BeamSearcher(
            prompt_ids, width, tok.eos_token_ids, length_penalty=params.length_penalty,
            ignore_eos=params.ignore_eos, temperature=params.temperature,
            max_model_len=proc.max_model_len)
        instances = searcher.instances
        per_batch = concurrency_limit or max(len(instances), 1)
        for start in range(0, len(instances), per_batch):
            batch = instances[start:start + per_batch]
            steps = tqdm(range(params.max_tokens), desc="Beam search", unit="token",
                         disable=not use_tqdm, dynamic_ncols=True)
            for _ in steps:
                live = searcher.live_beams(batch)
                if not live:
                    break
                outs = self._run([b.tokens for _, b in live], searcher.step_params, False,
                                 add_special_tokens=False, lora_request=lora_request)
                searcher.advance(live, outs)
            steps.close()

        results = []
        for best in searcher.best():
            for beam in best:
                beam.text = searcher.text(beam, tok, True, params.include_stop_str_in_output)
            results.append(BeamSearchOutput(sequences=best))
        return results


_POOLING_ONLY = (
    "{api} is only supported for reward models, which modelport does not serve: embeddings "
    "(LLM.embed()), classification (LLM.classify()) and scoring (LLM.score()) are, with "
    "LLM(..., runner='pooling'); generation is (LLM.generate() / LLM.chat())"
)


def _per_prompt_loras(lora_request: Any, n: int) -> list[LoRARequest | None]:
    """vLLM's lora_request argument: None, one LoRARequest for all, or one per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    if isinstance(lora_request, (str, Mapping)) or not isinstance(lora_request, Iterable):
        raise ValueError(f"lora_request must be a LoRARequest, None or a list of them, got "
                         f"{type(lora_request).__name__}")
    loras = list(lora_request)
    if len(loras) != n:
        raise ValueError(f"got {len(loras)} LoRA requests for {n} prompts; pass one or one each")
    for lr in loras:
        if lr is not None and not isinstance(lr, LoRARequest):
            raise ValueError(f"lora_request entries must be LoRARequest or None, got "
                             f"{type(lr).__name__}")
    return loras


def _normalize_prompts(prompts, prompt_token_ids) -> list[PromptInput]:
    """One prompt or a batch of them -> a list of prompts (each checked when it is added)."""
    if prompt_token_ids is not None:
        return [list(p) for p in prompt_token_ids]
    if prompts is None:
        raise ValueError("give prompts (strings, token id lists or prompt dicts)")
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a prompt or a list of them, got {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and is_token_ids(prompts):
        return [prompts]  # a single token-id prompt
    return prompts


def _check_text_only(conversation: Conversation) -> None:
    """ValueError for a content part other than text (an image, audio, ...): the models
    modelport serves read text only, and the part would reach the prompt as Python text."""
    for i, m in enumerate(conversation):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(
                    f"message {i} has a content part of type {kind!r}: this model reads text "
                    "only (content parts must be {'type': 'text', 'text': ...})"
                )
