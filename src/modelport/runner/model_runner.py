"""ModelRunner: owns every tensor. Turns a SchedulerOutput into flat inputs, runs the model, samples.

execute() is the whole contract: SchedulerOutput in, RunnerOutput (token ids + logprobs) out.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from modelport.config import DEFAULT_CPU_KV_CACHE_MEMORY, num_kv_blocks
from modelport.engine.arg_utils import EngineConfig
from modelport.engine.messages import TokenLogprobs
from modelport.engine.scheduler import ScheduledRequest, SchedulerOutput
from modelport.layers.attention import AttentionMetadata, ForwardContext, forward_context
from modelport.models.token_types import step_token_types
from modelport.runner.sampler import (
    Sampler,
    SamplingRow,
    compute_logprobs,
    greedy_tokens,
    plain_greedy,
    to_device,
)
from modelport.runner.spec_verify import accepted_tokens, verify
from modelport.sampling_params import SamplingParams, num_logprobs

if TYPE_CHECKING:
    from modelport.runner.logits_processors import LogitsProcessors

logger = logging.getLogger(__name__)

# the profiling forward's sampler settings (ModelRunner.profile_run)
PROFILE_TOP_K, PROFILE_LOGPROBS = 50, 20
# rows of prompt logprobs whose logits exist at once (ModelRunner._prompt_logprobs)
PROMPT_LOGPROB_ROWS = 256

Fill = Callable[[torch.Tensor], None]  # patches a step's device input ids in place


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    # speculative decoding: request id -> accepted drafts + the model's next token
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    # a pooling runner: request id -> pooled vector, for requests whose prompt ended
    pooled: dict[str, list[float]] | None = None
    # ... and the [n, d] shape of each per-token one (token_embed / token_classify)
    pooled_shapes: dict[str, list[int]] | None = None


@dataclass
class PendingStep:
    """A launched step: its sampled ids are on their way to the host (collect() waits)."""

    out: RunnerOutput  # logprobs are filled at launch; sampled ids at collect
    sample_ids: list[str] = field(default_factory=list)  # request ids, in token order
    tokens_host: torch.Tensor | None = None
    done: torch.cuda.Event | None = None
    # speculative requests (id, drafts) in order, and their verify() results end to end
    spec: list[tuple[str, list[int]]] = field(default_factory=list)
    spec_host: torch.Tensor | None = None


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The garbage collector off while CUDA graphs are captured: a collection that frees an
    engine dropped earlier in this process (its graphs, its cuBLAS workspaces) would make
    CUDA calls that are illegal while a stream captures, and invalidate the capture (a
    second LLM built after `del llm` in one process failed so on the H100). Collected once
    before, as vLLM does around its capture."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def zeroed_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV cache tensor. On the CPU it lies in an anonymous mapping: the kernel
    hands its pages out already zero as they are first touched, where torch.zeros would write
    the whole default 1 GiB budget at start-up (seconds, and all of it resident at once)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)
    return raw[:nbytes].view(dtype).view(shape)


def mixed_warmup_batches(max_batch: int, block_size: int, prefill_tokens: int = 16,
                         max_tokens: int | None = None,
                         ) -> list[tuple[list[int], list[int], list[int], list[int], list[list[int]]]]:
    """(input ids, positions, query start locations, seq lens, block tables) of one mixed
    step per decode batch bucket up to max_batch: bucket - 1 decode rows (two tokens of
    context) and one prefill row of prefill_tokens (fewer where the step would pass
    max_tokens, at least 2), every row on block 0."""
    from modelport.layers.triton_attention import batch_bucket

    out = []
    for b in sorted({batch_bucket(n) for n in range(1, max_batch + 1)}):
        p = prefill_tokens if max_tokens is None else min(prefill_tokens, max_tokens - b + 1)
        p = max(2, p)
        ids = [0] * (b - 1 + p)
        positions = [1] * (b - 1) + list(range(p))
        qsl = list(range(b)) + [b - 1 + p]
        seq_lens = [2] * (b - 1) + [p]
        tables = [[0] * -(-p // block_size)] * b
        out.append((ids, positions, qsl, seq_lens, tables))
    return out


class ModelRunner:
    def __init__(self, config: EngineConfig, tp_rank: int = 0) -> None:
        self.config = config
        self.tp_rank = tp_rank
        self.tp_size = config.parallel_config.tensor_parallel_size
        self.tp_workers = None  # on rank 0 of a tensor-parallel group: the other ranks
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.tp_size > 1:
            self.device = torch.device("cuda", (self.device.index or 0) + tp_rank)
        self.dtype = getattr(torch, config.dtype)
        self.block_size = config.cache_config.block_size
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        # speculative decoding with a draft model: its weights and KV cache (same blocks)
        self.draft_model: torch.nn.Module | None = None
        self.draft_config = None  # its ModelConfig
        self.draft_kv_caches: list[torch.Tensor] = []
        self.eagle = None  # an EagleProposer when the draft is an EAGLE(-3) head (runner/eagle.py)
        self.num_blocks = 0
        self.sampler = Sampler(self._logits_processors())
        self.generators: dict[str, torch.Generator] = {}
        self.graphs = None  # DecodeGraphs on CUDA unless enforce_eager (see cuda_graphs.py)
        self.piecewise = None  # PiecewiseGraphs for prefill / mixed steps (CUDA, tp 1)
        # the last launched step's sampled ids (device) and each sampling request's row in it:
        # a placeholder token of the next step (async scheduling) is read from here
        self._prev_tokens: torch.Tensor | None = None
        self._prev_rows: dict[str, int] = {}
        # an embedding model (runner "pooling"): hidden states are pooled, never sampled
        self.pooler = None
        self.lora = None  # a LoRAManager with enable_lora (set once the model is loaded)
        # sleep mode (runner/sleep.py): the storages the loader built, the weights while
        # asleep (None: awake) and whether the KV cache is given back
        self._built_storages: dict[str, torch.UntypedStorage] = {}
        self._sleeping_weights = None
        self._kv_asleep = False
        if config.runner_type == "pooling":
            from modelport.runner.pooler import Pooler

            self.pooler = Pooler(config.pooler_config)

    def _logits_processors(self) -> LogitsProcessors | None:
        """The custom logits processors, built where sampling runs (rank 0)."""
        classes = getattr(self.config, "logits_processors", ())
        if not classes or self.tp_rank != 0 or self.config.runner_type != "generate":
            return None
        from modelport.runner.logits_processors import LogitsProcessors

        return LogitsProcessors(classes, self.config, self.device)

    @property
    def supports_async(self) -> bool:
        """Async scheduling needs every rank to read placeholder ids on its own device."""
        return self.tp_size == 1

    # -- start-up ------------------------------------------------------------------------
    def load_model(self) -> None:
        from modelport.loader import load_model

        t0 = time.perf_counter()
        world = self.config.parallel_config.world_size
        if self.device.type == "cpu" and world > 1 and self.tp_rank == 0:
            from modelport.parallel.workers import cpu_threads_per_rank

            torch.set_num_threads(cpu_threads_per_rank(world))
        if self.tp_size > 1 and self.tp_rank == 0:
            from modelport.parallel.workers import TPWorkers

            self.tp_workers = TPWorkers(self.config, self.device.type)
        self.model = self._build_model()
        if self.config.enable_sleep_mode:  # what a level-2 wake-up builds again and refills
            from modelport.runner.sleep import module_storages

            self._built_storages = module_storages([self.model], self.device)
        if self.config.lora_config is not None:
            from modelport.lora.manager import LoRAManager

            self.lora = LoRAManager(self.model, self.config.lora_config, self.device, self.dtype,
                                    record_placements=self.tp_workers is not None)
        spec = self.config.speculative_config
        if spec is not None and spec.model is not None:
            from modelport.config import LoadConfig
            from modelport.loader import load_model_config, resolve_model

            src = resolve_model(spec.model)
            from dataclasses import replace

            max_len = self.config.scheduler_config.max_model_len
            if spec.method in ("eagle", "eagle3"):
                from modelport.models.eagle_llama import load_eagle_head
                from modelport.runner.eagle import EagleProposer

                if src.kind != "hf":
                    raise ValueError(f"an EAGLE head must be an HF folder, got {src.path}")
                self.draft_model = load_eagle_head(src.path, self.model, max_len, self.dtype,
                                                   self.device, spec.method)
                self.draft_config = self.draft_model.config
                self.eagle = EagleProposer(self)
            else:
                # the engine's length, as the target's (LongRoPE picks its factors by it)
                self.draft_config = replace(load_model_config(src), max_model_len=max_len)
                if getattr(self.config, "disable_sliding_window", False):  # as the target's
                    from modelport.models.sliding import without_sliding_window

                    self.draft_config = without_sliding_window(self.draft_config)
                self.draft_model = load_model(src, self.draft_config, LoadConfig(), self.dtype,
                                              self.device)
            logger.info("draft model for speculative decoding: %s (%d layers)", src.name,
                        self.draft_config.num_hidden_layers)
        n_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info(
            "loaded %s (%s) on %s as %s: %.1f MiB of weights in %.1f s",
            self.config.model_source.name, self.config.model_config.architecture, self.device,
            self.config.dtype, n_bytes / 2**20, time.perf_counter() - t0,
        )

    def _build_model(self, bind: bool = True) -> torch.nn.Module:
        """Load this rank's model and apply the device's kernel passes (again at a level-2
        wake-up, with bind=False: the pooler keeps the heads it took at start)."""
        from modelport.loader import load_model

        torch.manual_seed(self.config.seed)  # the dummy load format's weights, every build
        shard = None
        build: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.tp_size > 1:
            from modelport.parallel.moe_parallel import sharded_at_build
            from modelport.parallel.tensor_parallel import shard_model

            ep = self.config.parallel_config.enable_expert_parallel

            def shard(model: torch.nn.Module) -> None:  # between loading and kernel repacking
                shard_model(model, self.tp_rank, self.tp_size, ep)
            # MoE experts are built and loaded as this rank's slice (never whole on one rank);
            # with expert parallelism as this rank's share of whole experts
            build = sharded_at_build(self.tp_rank, self.tp_size, ep)
        with build:
            model = load_model(
                self.config.model_source, self.config.model_config, self.config.load_config,
                self.dtype, self.device, transform=shard,
            )
        if self.pooler is not None and bind:  # a classifier's head (seq_cls.py), BGE-M3's
            self.pooler.bind(model)
        if self.device.type == "cuda":
            from modelport.layers.fused_ops import fuse_small_ops

            logger.info("fused small ops on CUDA: %d modules", fuse_small_ops(model))
            if os.environ.get("MODELPORT_TRITON_GEMV", "1") != "0":
                from modelport.layers.triton_gemv import use_gemv_for_decode

                n = use_gemv_for_decode(model)
                logger.info("Triton GEMV for single-row calls: %d linear modules", n)
                if (os.environ.get("MODELPORT_FUSED_DECODE", "0") == "1"
                        and self.config.lora_config is None):  # fused layers skip LoRA
                    from modelport.layers.fused_decode import fuse_decode_layers

                    n = fuse_decode_layers(model)
                    logger.info("fused single-row decode layers (norm/SiLU/residual in the "
                                "GEMVs): %d", n)
        return model

    @property
    def kv_dtype(self) -> torch.dtype:
        kd = self.config.cache_config.kv_cache_dtype
        return self.dtype if kd == "auto" else getattr(torch, {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn"}.get(kd, kd))

    def uniform_sliding_window(self) -> int | None:
        """The window when every attention layer of the model (and of a draft model: it reads
        the same block tables) slides over the same number of positions, else None. Only then
        may a request's blocks that left the window be given back while it runs."""
        from modelport.layers.attention import Attention

        models = [self.model, getattr(self, "draft_model", None)]
        windows = {m.sliding_window for model in models if model is not None
                   for m in model.modules() if isinstance(m, Attention)}
        if len(windows) != 1:
            return None
        (window,) = windows
        return window

    def determine_num_blocks(self) -> int:
        cc = self.config.cache_config
        mc = self.config.model_config
        kv_bytes = torch.empty((), dtype=self.kv_dtype).element_size()
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = cc.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
        n = num_kv_blocks(budget, mc, self.block_size, kv_bytes, self.config.parallel_config.tensor_parallel_size)
        if self.draft_config is not None:  # one block holds the target's and the draft's K/V
            from modelport.config import kv_cache_bytes_per_token

            per_token = (kv_cache_bytes_per_token(mc, kv_bytes)
                         + kv_cache_bytes_per_token(self.draft_config, kv_bytes))
            n = int(budget) // (self.block_size * per_token)
        if cc.num_gpu_blocks_override is not None:  # vLLM's: the budget is not the limit
            logger.info("KV cache: %d blocks (--num-gpu-blocks-override; the budget gives %d)",
                        cc.num_gpu_blocks_override, n)
            n = cc.num_gpu_blocks_override
        need = -(-self.config.scheduler_config.max_model_len // self.block_size)
        if n < need:
            raise ValueError(
                f"the KV cache budget ({budget / 2**20:.1f} MiB -> {n} blocks of {self.block_size} "
                f"tokens) cannot hold one max_model_len request ({self.config.scheduler_config.max_model_len} "
                f"tokens = {need} blocks); raise kv_cache_memory / gpu_memory_utilization or lower max_model_len"
            )
        return n

    def _cuda_kv_budget(self) -> int:
        """gpu_memory_utilization x total - (memory in use after a profiling forward at max batch),
        or kv_cache_memory when given (vLLM's kv_cache_memory_bytes), checked against what is
        free after the profiling forward."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        # what the allocator keeps after giving its idle segments back: free blocks inside
        # segments that still hold live tensors (an online quantization's or restacking's
        # leftovers) cannot hold a layer's cache, so they are not counted as free
        torch.cuda.empty_cache()
        stuck = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        fixed = self.config.cache_config.kv_cache_memory
        if fixed is not None:  # vLLM's kv_cache_memory_bytes: gpu_memory_utilization unused
            # what the process can still get for the cache's large blocks (the idle segments
            # went back above; the free blocks of part-used ones are too small)
            available = free
            if fixed > available:
                raise ValueError(
                    f"kv_cache_memory {fixed / 2**30:.2f} GiB does not fit: {available / 2**30:.2f} "
                    f"GiB of the {total / 2**30:.1f} GiB device is free after the weights and a "
                    "profiling forward; lower kv_cache_memory"
                )
            logger.info("CUDA memory: total %.2f GiB, KV cache %.2f GiB (kv_cache_memory)",
                        total / 2**30, fixed / 2**30)
            return fixed
        used_by_others = total - free - reserved
        budget = (int(total * self.config.cache_config.gpu_memory_utilization) - peak
                  - used_by_others - stuck)
        logger.info(
            "CUDA memory: total %.2f GiB, peak during profiling %.2f GiB, held in part-used "
            "segments %.2f GiB, KV budget %.2f GiB",
            total / 2**30, peak / 2**30, stuck / 2**30, budget / 2**30,
        )
        if budget <= 0:
            raise ValueError(
                f"no memory left for the KV cache: gpu_memory_utilization "
                f"{self.config.cache_config.gpu_memory_utilization} x {total / 2**30:.1f} GiB is below "
                f"the {peak / 2**30:.1f} GiB that weights and activations need"
            )
        return budget

    @torch.inference_mode()
    def profile_run(self) -> None:
        assert self.model is not None
        if self.tp_workers is not None:
            self.tp_workers.send(("profile", None))
        n = self.config.scheduler_config.max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device) % self.config.scheduler_config.max_model_len
        with forward_context(ForwardContext(None, [])):
            hidden = self.model(ids, pos)
        if getattr(self, "pooler", None) is not None:  # a pooling model: no LM head, no sampler
            return
        rows = min(n, self.config.scheduler_config.max_num_seqs)
        logits = self.model.compute_logits(hidden[-rows:]).float()
        del hidden
        # the sampler at its widest, as a real step may ask: random sampling with top-k, top-p
        # and logprobs on every row (the sort, softmax and noise copies of [rows, vocab]). A
        # plain Sampler: the custom logits processors keep their batch state
        params = SamplingParams(temperature=1.0, top_k=PROFILE_TOP_K, top_p=0.9,
                                logprobs=PROFILE_LOGPROBS)
        Sampler()(logits, [SamplingRow(f"profile-{i}", params, [0], [], (), None)
                           for i in range(rows)])

    def init_kv_cache(self, num_blocks: int) -> None:
        if self.tp_workers is not None:
            self.tp_workers.send(("kv", num_blocks))
        self.num_blocks = num_blocks
        if self._alloc_kv_cache():
            self._capture_if_wanted()

    def _alloc_kv_cache(self) -> bool:
        """Allocate self.num_blocks blocks per layer; False for a model without a KV cache."""
        if not getattr(self.model, "uses_kv_cache", True):  # an encoder (models/bert.py):
            return False  # the scheduler's blocks are bookkeeping only
        num_blocks = self.num_blocks
        mc = self.config.model_config
        tp = self.config.parallel_config.tensor_parallel_size
        kv_heads = max(1, mc.num_key_value_heads // tp)
        shape = (2, num_blocks, self.block_size, kv_heads, mc.head_dim)
        if self.device.type == "cuda":
            # the allocator's idle cache goes back to the device first. Rank 0's budget
            # (_cuda_kv_budget) already did this; a tensor-parallel worker did not, and its
            # profiling forward's activations would otherwise stay reserved beside its cache
            torch.cuda.empty_cache()
        self.kv_caches = [zeroed_cache(shape, self.kv_dtype, self.device)
                          for _ in range(mc.num_hidden_layers)]
        if self.draft_config is not None:
            dc = self.draft_config
            draft_shape = (2, num_blocks, self.block_size, dc.num_key_value_heads, dc.head_dim)
            self.draft_kv_caches = [zeroed_cache(draft_shape, self.kv_dtype, self.device)
                                    for _ in range(dc.num_hidden_layers)]
        return True

    def _capture_if_wanted(self) -> None:
        if self.device.type == "cuda" and not self.config.enforce_eager and self.tp_size == 1:
            with _no_gc():
                self._capture_cuda_graphs()

    # -- sleep mode (vLLM's LLM.sleep / wake_up) ----------------------------------------
    @property
    def is_sleeping(self) -> bool:
        return self._kv_asleep or self._sleeping_weights is not None

    def sleep(self, level: int) -> None:
        """Give the KV cache back and offload (level 1) or drop (level 2) the weights, on
        every tensor-parallel rank. The CUDA graphs go too: they hold the addresses of
        weights and cache, which come back elsewhere (captured again at wake-up)."""
        from modelport.runner.sleep import SleepingWeights, forget_derived, module_storages

        if self.tp_workers is not None:
            self.tp_workers.send(("sleep", level))
        self.graphs = None
        self.piecewise = None
        self._prev_tokens = None
        self._prev_rows = {}
        self.kv_caches = []
        self.draft_kv_caches = []
        self._kv_asleep = True
        forget_derived([self.model, self.draft_model])
        if self._sleeping_weights is not None:  # asleep already: level 2 drops more
            if level == 2 and self._sleeping_weights.level == 1:
                self._sleeping_weights.deepen()
                logger.info("sleep level 2 (was 1): the weights' host copies dropped")
        else:
            current = module_storages([self.model, self.draft_model], self.device)
            self._sleeping_weights = SleepingWeights(current, self._built_storages,
                                                     self.device, level)
            freed = self._sleeping_weights.nbytes_freed / 2**20
            where = ("dropped" if level == 2 else "moved to host memory"
                     if self.device.type != "cpu" else "left in host memory")
            logger.info("sleep level %d: KV cache freed, %.1f MiB of weights %s", level, freed,
                        where)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore the weights and/or the KV cache (vLLM's tags "weights", "kv_cache"; None:
        both); once both are back, the CUDA graphs are captured again."""
        tags = list(tags or ("weights", "kv_cache"))
        if self.tp_workers is not None:
            self.tp_workers.send(("wake", tags))
        woke = False
        if "weights" in tags and self._sleeping_weights is not None:
            def rebuild() -> dict[str, torch.UntypedStorage]:
                from modelport.runner.sleep import module_storages

                devices = []  # the generators' states as they were: seeding is the build's
                if self.device.type == "cuda":
                    index = self.device.index
                    devices = [torch.cuda.current_device() if index is None else index]
                with torch.random.fork_rng(devices=devices):
                    fresh = self._build_model(bind=False)
                return module_storages([fresh], self.device)

            self._sleeping_weights.restore(rebuild)
            self._sleeping_weights = None
            woke = True
        if "kv_cache" in tags and self._kv_asleep:
            self._alloc_kv_cache()
            self._kv_asleep = False
            woke = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if woke and not self.is_sleeping and self.kv_caches:
            self._capture_if_wanted()

    def _capture_cuda_graphs(self) -> None:
        """Capture decode steps for the batch ladder, when the CUDA kernels serve this model.

        Padded graph rows rely on the Triton KV write skipping slot -1, so graphs are only
        used where that backend applies; otherwise decode stays eager (logged, not an error).
        """
        from modelport.layers import triton_attention as ta
        from modelport.runner.cuda_graphs import DecodeGraphs

        if self.eagle is not None and self.config.speculative_config.method == "eagle3":
            logger.info("CUDA graphs off: an EAGLE-3 head reads the target's per-layer streams, "
                        "which the graphs do not keep")
            return
        mc = self.config.model_config
        probe = torch.empty(1, mc.num_attention_heads, mc.head_dim, dtype=self.dtype,
                            device=self.device)
        if not ta.supports(probe, self.kv_caches[0], mc.head_dim):
            logger.info("CUDA graphs off: the Triton attention kernels do not cover dtype %s / "
                        "KV dtype %s / head_dim %d", self.dtype, self.kv_dtype, mc.head_dim)
            return
        sc = self.config.scheduler_config
        graphs = DecodeGraphs(
            self.model, self.kv_caches,
            min(sc.max_num_seqs, sc.max_num_batched_tokens, self.config.max_graph_batch),
            -(-sc.max_model_len // self.block_size), self.block_size, self.device,
        )
        graphs.capture()
        self.graphs = graphs
        from modelport.runner import piecewise_graphs as pg

        if pg.ENABLED and pg.token_buckets(sc.max_num_batched_tokens):
            pw = pg.PiecewiseGraphs(
                self.model, self.kv_caches, sc.max_num_batched_tokens, mc.num_attention_heads,
                mc.head_dim, self.dtype, self.block_size, self.device,
            )
            if pw.capture():
                self.piecewise = pw
        if os.environ.get("MODELPORT_WARMUP_STEPS", "1") != "0":
            self._warm_mixed_steps()

    def _warm_mixed_steps(self) -> None:
        """Run, at start-up, one mixed prefill + decode step per decode batch bucket, so the
        kernel variants such a step picks by its request count (the decode attention's launch
        config and context splits go by the bucket) are compiled before the first request
        instead of in front of it: under load the first step of each new bucket otherwise
        stalls every running request for the compilation (seconds of TTFT in the first
        seconds of a served Poisson load). Every KV write goes to slot -1 (skipped)."""
        assert self.graphs is not None
        t0 = time.perf_counter()
        batches = mixed_warmup_batches(
            self.graphs.max_batch, self.block_size,
            max_tokens=self.config.scheduler_config.max_num_batched_tokens)
        for input_ids, positions, qsl, seq_lens, tables in batches:
            slots = [-1] * len(input_ids)
            if self.piecewise is not None and len(input_ids) <= self.piecewise.max_tokens:
                meta = self._step_meta(self.piecewise.slot_view(len(input_ids)), qsl,
                                       seq_lens, tables)
                self.piecewise.replay(meta, input_ids, positions, slots)
            else:
                self._eager_forward(input_ids, positions, slots, qsl, seq_lens, tables)
        # steps past the largest piecewise graph run eagerly, their kernels taking the token
        # count as an argument (Triton specializes on its divisibility by 16): one of each
        sc = self.config.scheduler_config
        top = self.piecewise.max_tokens if self.piecewise is not None else 0
        eager = [n for n in (top + 16, top + 17) if top and n <= sc.max_num_batched_tokens]
        for n in eager:
            rows = [min(sc.max_model_len, n - i) for i in range(0, n, sc.max_model_len)]
            qsl = [0]
            for r in rows:
                qsl.append(qsl[-1] + r)
            positions = [p for r in rows for p in range(r)]
            tables = [[0] * -(-r // self.block_size) for r in rows]
            self._eager_forward([0] * n, positions, [-1] * n, qsl, rows, tables)
        torch.cuda.synchronize(self.device)
        logger.info("warmed up mixed prefill / decode steps for %d batch sizes and %d eager "
                    "step sizes in %.1f s", len(batches), len(eager), time.perf_counter() - t0)

    def shutdown(self) -> None:
        if self.tp_workers is not None:
            self.tp_workers.shutdown()
            self.tp_workers = None

    # -- the forward: eager, or a decode batch replayed from its CUDA graph ------------------
    def _to_dev(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.device)

    def _placeholder_fill(self, holes: list[tuple[int, int]]) -> Fill | None:
        """A function writing the previous step's sampled ids into the holes of input ids.

        holes: (index into this step's input ids, row of the previous step's sampled ids).
        """
        if not holes:
            return None
        assert self._prev_tokens is not None
        idx = self._to_dev(torch.tensor(holes, dtype=torch.int64).t().contiguous())
        prev = self._prev_tokens

        def fill(ids: torch.Tensor) -> None:
            ids.index_copy_(0, idx[0], prev.index_select(0, idx[1]))

        return fill

    def _step_meta(self, slots: list[int] | torch.Tensor, qsl: list[int], seq_lens: list[int],
                   tables: list[list[int]]) -> AttentionMetadata:
        # slots: a host list, copied over; or a device tensor already holding them
        # width rounded up to 16 entries: the Triton kernels specialize on their integer
        # arguments' divisibility by 16, so a width that changes with every step would
        # otherwise compile a second variant of each in the middle of a run
        width = -(-max(len(t) for t in tables) // 16) * 16
        table_np = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table_np[i, : len(t)] = t
        to_dev = self._to_dev
        return AttentionMetadata(
            slot_mapping=(slots if isinstance(slots, torch.Tensor)
                          else to_dev(torch.tensor(slots, dtype=torch.int64))),
            query_start_loc=to_dev(torch.tensor(qsl, dtype=torch.int32)),
            seq_lens=to_dev(torch.tensor(seq_lens, dtype=torch.int32)),
            block_tables=to_dev(torch.from_numpy(table_np)),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
        )

    def _eager_forward(self, input_ids: list[int], positions: list[int], slots: list[int],
                       qsl: list[int], seq_lens: list[int], tables: list[list[int]],
                       fill: Fill | None = None) -> torch.Tensor:
        meta = self._step_meta(slots, qsl, seq_lens, tables)
        to_dev = self._to_dev
        ids_t = to_dev(torch.tensor(input_ids, dtype=torch.long))
        if fill is not None:
            fill(ids_t)
        pos_t = to_dev(torch.tensor(positions, dtype=torch.long))
        with forward_context(ForwardContext(meta, self.kv_caches)):
            return self.model(ids_t, pos_t)

    def _replay_decode(self, input_ids: list[int], positions: list[int], slots: list[int],
                       seq_lens: list[int], tables: list[list[int]], fill: Fill | None = None,
                       ) -> torch.Tensor:
        assert self.graphs is not None
        n = len(input_ids)
        host = self.graphs.host_inputs(n)
        host.input_ids[:] = input_ids
        host.positions[:] = positions
        host.slots[:] = slots
        host.seq_lens[:] = seq_lens
        bt = host.block_tables
        for i, t in enumerate(tables):
            bt[i, : len(t)] = t
        return self.graphs.replay(n, fill)

    def _draft_forward(self, ids: list[int] | torch.Tensor, positions: list[int],
                       slots: list[int], qsl: list[int], seq_lens: list[int],
                       tables: list[list[int]], hidden: torch.Tensor | None = None,
                       ) -> torch.Tensor:
        """The draft model's forward on its own KV cache; an EAGLE head also takes each row's
        hidden state (``hidden``)."""
        assert self.draft_model is not None
        meta = self._step_meta(slots, qsl, seq_lens, tables)
        ids_t = ids if isinstance(ids, torch.Tensor) else self._to_dev(torch.tensor(ids, dtype=torch.long))
        pos_t = self._to_dev(torch.tensor(positions, dtype=torch.long))
        extra = () if hidden is None else (hidden,)
        with forward_context(ForwardContext(meta, self.draft_kv_caches)):
            return self.draft_model(ids_t, pos_t, *extra)

    def _draft_step(self, so: SchedulerOutput) -> None:
        """The draft model's share of a step: one pass over the step's known tokens (so its
        KV cache holds every position the target computes), then one token a pass for the
        requests scheduled with drafts, whose greedy continuation replaces the scheduler's
        placeholders in ``spec_token_ids``. Pass j writes the KV of draft j - 1, so after d
        passes a request's draft KV is complete up to its last draft."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        drafting: list[tuple] = []  # (scheduled, last row of pass 0)
        for s in so.scheduled:
            n = 1 if s.spec_token_ids else s.num_tokens
            span = range(s.start, s.start + n)
            ids.extend(s.request.all_token_ids[s.start : s.start + n])
            positions.extend(span)
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in span)
            qsl.append(qsl[-1] + n)
            seq_lens.append(s.start + n)
            tables.append(s.block_ids)
            if s.spec_token_ids:
                drafting.append((s, qsl[-1] - 1))
        hidden = self._draft_forward(ids, positions, slots, qsl, seq_lens, tables)
        if not drafting:
            return
        rows = self._to_dev(torch.tensor([r for _, r in drafting]))
        latest = greedy_tokens(self.draft_model.compute_logits(hidden[rows]).float())
        proposed = [latest]  # proposed[j][i]: draft j of request i
        longest = max(len(s.spec_token_ids) for s, _ in drafting)
        for j in range(1, longest + 1):
            active = [i for i, (s, _) in enumerate(drafting) if len(s.spec_token_ids) >= j]
            scheds = [drafting[i][0] for i in active]
            span = [s.start + j for s in scheds]
            hidden = self._draft_forward(
                latest[self._to_dev(torch.tensor(active))], span,
                [s.block_ids[p // bs] * bs + p % bs for s, p in zip(scheds, span)],
                list(range(len(active) + 1)), [p + 1 for p in span], [s.block_ids for s in scheds])
            if j == longest:
                break  # the last pass only writes the last draft's KV
            latest = latest.clone()
            latest[self._to_dev(torch.tensor(active))] = greedy_tokens(
                self.draft_model.compute_logits(hidden).float())
            proposed.append(latest)
        table = torch.stack(proposed).tolist()  # the step's one wait for the draft model
        for i, (s, _) in enumerate(drafting):
            s.spec_token_ids[:] = [table[j][i] for j in range(len(s.spec_token_ids))]

    def _generator(self, req) -> torch.Generator | None:  # noqa: ANN001 - a Request
        """The seeded request's own generator (made on its first sampled token)."""
        p = req.sampling_params
        if p.seed is None or p.greedy:
            return None
        gen = self.generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(p.seed)
            self.generators[req.request_id] = gen
        return gen

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor's copy on its way to pinned host memory (CUDA: read it after the
        step's event); on the CPU the tensor itself."""
        if self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    # -- the step ------------------------------------------------------------------------
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its tokens."""
        pending = self.launch(so)
        return self.collect(pending) if pending is not None else RunnerOutput()

    def collect(self, pending: PendingStep) -> RunnerOutput:
        """Wait for a launched step's sampled ids; the only device-to-host sync of a step."""
        out = pending.out
        if pending.sample_ids or pending.spec:
            if pending.done is not None:
                pending.done.synchronize()
        if pending.sample_ids:
            out.sampled = dict(zip(pending.sample_ids, pending.tokens_host.tolist()))
        if pending.spec:
            flat, off = pending.spec_host.tolist(), 0
            for rid, draft in pending.spec:
                width = 2 * len(draft) + 1
                out.spec_tokens[rid] = accepted_tokens(flat[off : off + width], draft)
                off += width
        return out

    def _greedy_head_tokens(self, hidden: torch.Tensor, sample_reqs: list) -> torch.Tensor | None:
        """A CPU step whose every row is plain greedy (sampler.plain_greedy): the LM head's
        exact greedy path (LMHead.greedy), the same tokens as the logits and the Sampler's
        argmax; None where it does not apply."""
        head_greedy = getattr(getattr(self.model, "lm_head", None), "greedy", None)
        lps = self.sampler.logits_processors
        if lps is not None and lps.changes_argmax:
            return None
        if head_greedy is None or getattr(self.model.lm_head, "exact_weight", None) is None:
            return None
        vocab = self.model.lm_head.exact_weight.shape[0]
        for s, _ in sample_reqs:
            req = s.request
            row = SamplingRow(req.request_id, req.sampling_params, req.prompt_token_ids,
                              req.output_token_ids, req.eos_token_ids, None, req.active_grammar)
            if not plain_greedy(row, vocab):
                return None
        return head_greedy(hidden)

    @torch.inference_mode()
    def launch(self, so: SchedulerOutput) -> PendingStep | None:
        """Queue one step on the device; returns without waiting for it (None: nothing to run).

        A scheduled token at index >= the request's known tokens is a placeholder: the token
        the previous (still running) step samples for it, read on the device.
        """
        assert self.model is not None
        for rid in so.finished_ids:
            self.generators.pop(rid, None)
        if self.pooler is not None:
            self.pooler.drop(so.finished_ids)
        if self.eagle is not None:
            self.eagle.drop(so.finished_ids + so.preempted_ids)
        if so.is_empty:
            return None
        if self.eagle is not None:
            self.eagle.propose(so)
        elif self.draft_model is not None:
            self._draft_step(so)
        out = RunnerOutput()
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        holes: list[tuple[int, int]] = []  # (input index, row in the previous step's tokens)
        logit_rows: list[int] = []  # flat token index whose logits we need
        sample_reqs = []  # (scheduled, row index into logits)
        spec_reqs = []  # (scheduled, first row index into logits): speculative decoding
        prompt_lp_reqs = []  # (scheduled, first row, count)
        for s in so.scheduled:
            req = s.request
            start, n = s.start, s.num_tokens
            known = req.num_tokens
            if s.spec_token_ids:  # the last known token, then the drafts
                input_ids.extend(req.all_token_ids[start:known])
                input_ids.extend(s.spec_token_ids)
            elif start + n <= known:
                input_ids.extend(req.all_token_ids[start : start + n])
            else:  # the last token is still being sampled by the step in flight
                input_ids.extend(req.all_token_ids[start:known])
                holes.append((len(input_ids), self._prev_rows[req.request_id]))
                input_ids.append(0)
            blk = s.block_ids
            if n == 1:
                positions.append(start)
                slots.append(blk[start // bs] * bs + start % bs)
            else:
                positions.extend(range(start, start + n))
                slots.extend(blk[p // bs] * bs + p % bs for p in range(start, start + n))
            base = qsl[-1]
            qsl.append(base + n)
            seq_lens.append(start + n)
            tables.append(blk)
            if req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                # rows of the hidden states (their logits come in chunks, _prompt_logprobs)
                prompt_lp_reqs.append((s, base, min(n, req.num_prompt_tokens - 1 - start)))
            if s.spec_token_ids:
                spec_reqs.append((s, len(logit_rows)))
                logit_rows.extend(range(base, base + n))
            elif s.sample:
                sample_reqs.append((s, len(logit_rows)))
                logit_rows.append(base + n - 1)
        dev = self.device
        n_reqs = len(tables)
        fill = self._placeholder_fill(holes)
        # a step with LoRA requests runs eagerly (the graphs hold the base model only)
        lora = self.lora.mapping(so.scheduled) if self.lora is not None else None
        if lora is not None:
            from modelport.lora.layers import lora_mapping

            if self.tp_workers is not None:  # the other ranks follow rank 0's slots and rows
                self.tp_workers.send(("lora_fwd", (
                    self.lora.take_placements(), lora.spec,
                    (input_ids, positions, slots, qsl, seq_lens, tables))))
            with lora_mapping(lora):
                hidden = self._eager_forward(input_ids, positions, slots, qsl, seq_lens,
                                             tables, fill)
        elif (self.graphs is not None and len(input_ids) == n_reqs
                and n_reqs <= self.graphs.max_batch):
            hidden = self._replay_decode(input_ids, positions, slots, seq_lens, tables, fill)
        elif self.piecewise is not None and len(input_ids) <= self.piecewise.max_tokens:
            # the graphs' own slot buffer (written by the replay's input copy): no second copy
            meta = self._step_meta(self.piecewise.slot_view(len(input_ids)), qsl, seq_lens,
                                   tables)
            hidden = self.piecewise.replay(meta, input_ids, positions, slots, fill)
        else:
            if self.tp_workers is not None:
                self.tp_workers.send(("fwd", (input_ids, positions, slots, qsl, seq_lens, tables)))
            # an encoder's token types come from tokenization (models/token_types.py)
            with step_token_types(self.model, so.scheduled):
                hidden = self._eager_forward(input_ids, positions, slots, qsl, seq_lens, tables,
                                             fill)
        if self.eagle is not None:  # the next step's head reads the target's hidden states
            self.eagle.keep(so, hidden, qsl)
        if self.pooler is not None:  # no LM head, no sampler: the pooled vectors are the output
            out.pooled, out.pooled_shapes = self.pooler(so, hidden, qsl)
            return PendingStep(out)
        pending = PendingStep(out)
        if not logit_rows:
            self._prompt_logprobs(hidden, prompt_lp_reqs, out)
            return pending
        all_hidden = hidden
        if len(logit_rows) != hidden.shape[0]:  # rows are increasing: equal count = all rows
            hidden = hidden[self._to_dev(torch.tensor(logit_rows))]
        if (dev.type == "cpu" and lora is None and not spec_reqs and not prompt_lp_reqs
                and len(sample_reqs) == len(logit_rows)):
            fast = self._greedy_head_tokens(hidden, sample_reqs)
            if fast is not None:
                self._prev_tokens = fast
                pending.sample_ids = [s.request_id for s, _ in sample_reqs]
                self._prev_rows = {rid: i for i, rid in enumerate(pending.sample_ids)}
                pending.tokens_host = self._to_host(fast)
                return pending
        logits = self.model.compute_logits(hidden).float()

        if spec_reqs:
            results = []
            for s, first in spec_reqs:
                req = s.request
                rows_logits = logits[first : first + s.num_tokens]
                results.append(verify(rows_logits, s.spec_token_ids, req.sampling_params,
                                      self._generator(req), req.output_token_ids))
                pending.spec.append((req.request_id, s.spec_token_ids))
            pending.spec_host = self._to_host(torch.cat(results))
        if sample_reqs:
            rows = []
            for s, _ in sample_reqs:
                req = s.request
                rows.append(SamplingRow(req.request_id, req.sampling_params, req.prompt_token_ids,
                                        req.output_token_ids, req.eos_token_ids,
                                        self._generator(req), req.active_grammar))
            if len(sample_reqs) == logits.shape[0]:  # every row samples: no gather copy
                to_sample = logits
            else:
                to_sample = logits[self._to_dev(torch.tensor([r for _, r in sample_reqs]))]
            tokens, lps = self.sampler(to_sample, rows)
            pending.sample_ids = [s.request_id for s, _ in sample_reqs]
            self._prev_tokens = tokens
            self._prev_rows = {rid: i for i, rid in enumerate(pending.sample_ids)}
            pending.tokens_host = self._to_host(tokens)
            for (s, _), lp in zip(sample_reqs, lps):
                if lp is not None:
                    out.logprobs[s.request_id] = lp
        if dev.type == "cuda" and (sample_reqs or spec_reqs):
            pending.done = torch.cuda.Event()
            pending.done.record()
        self._prompt_logprobs(all_hidden, prompt_lp_reqs, out)
        return pending

    def _prompt_logprobs(self, hidden: torch.Tensor, reqs: list[tuple[ScheduledRequest, int, int]],
                         out: RunnerOutput) -> None:
        """Each (scheduled request, first hidden row, rows) its prompt tokens' logprobs, the
        LM head run on PROMPT_LOGPROB_ROWS rows at a time: a whole chunk's float32 logits at
        once (16,384 x 128,256 x 4 bytes = 8 GiB, twice with the log-softmax) would not fit
        beside a KV cache sized by a profiling forward that never made them."""
        for s, first, count in reqs:
            req = s.request
            targets = req.prompt_token_ids[s.start + 1 : s.start + 1 + count]
            got: list[TokenLogprobs] = []
            for c0 in range(0, count, PROMPT_LOGPROB_ROWS):
                c1 = min(count, c0 + PROMPT_LOGPROB_ROWS)
                lp = self.model.compute_logits(hidden[first + c0 : first + c1]).float()
                k = num_logprobs(req.sampling_params.prompt_logprobs or 0, lp.shape[-1])
                got += compute_logprobs(lp.log_softmax(dim=-1),
                                        torch.tensor(targets[c0:c1], device=lp.device), k)
            out.prompt_logprobs[s.request_id] = got
