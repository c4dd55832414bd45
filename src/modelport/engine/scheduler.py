"""Continuous batching by a per-step token budget. Pure Python: no torch.

Every step gives each running request the tokens it is owed (one for a decoding request, a
chunk for a prefilling one), then admits waiting requests while the token budget, the
sequence limit and the KV cache allow. When the cache runs dry for a running request, the
newest running request is preempted: its blocks are freed and it goes back to the front of
the waiting queue to be recomputed later (its full blocks usually survive in the prefix cache).

A request's tokens count as computed when they are scheduled, so the next step can be
scheduled while this one still runs on the GPU (async scheduling). The token that step will
sample is a placeholder until update() hears it: it already has a position and a KV slot,
and the runner takes its id from the previous step's sampled tokens on the device.

With speculative decoding (n-gram prompt lookup, engine/ngram.py), a decoding request is
scheduled with draft tokens after its last token: 1 + d positions and KV slots. update()
hears how many drafts the model accepted, appends them and the model's own next token, and
winds num_computed_tokens back to the positions whose KV holds accepted tokens (the slots
of rejected drafts are written again when those positions come round).

Scheduling policy (vLLM's scheduling_policy, SchedulerConfig.policy): with "fcfs" the
waiting queue is a deque (first come, first served; preempted requests go to its front) and
the victim of a preemption is the newest running request. With "priority" the waiting queue
is a heap by (priority, arrival time, request id), lower first, and the victim is the running
request with the largest (priority, arrival time): possibly one already scheduled earlier in
this step, whose tokens and budget are then taken back. As in vLLM V1, only running requests
preempt (a waiting request short of blocks waits); a running request that preempts itself
leaves the requests after it in the running list (of higher priority) to be scheduled.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from modelport.config import SchedulerConfig, SpeculativeConfig
from modelport.engine import ngram
from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    # tokens to compute this step: request.all_token_ids[start : start + num_tokens]
    start: int
    num_tokens: int
    # the request's block table after allocation
    block_ids: list[int]
    # this chunk reaches the end of the known tokens, so the runner samples a new token
    sample: bool
    # speculative decoding: draft tokens after the request's last token (num_tokens is then
    # 1 + len(spec_token_ids)); the runner checks them and samples from every position
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start : self.start + self.num_tokens]


@dataclass
class SchedulerOutput:
    # in batch order: running requests first, then newly admitted ones
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # total tokens this step (<= max_num_batched_tokens)
    num_batched_tokens: int = 0
    # requests preempted during this schedule() call
    preempted_ids: list[str] = field(default_factory=list)
    # requests that finished since the last step (the runner drops their per-request state)
    finished_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 speculative: SpeculativeConfig | None = None,
                 max_loras: int | None = None) -> None:
        self.config = config
        # multi-LoRA: adapters one step may run (None: LoRA off); see _lora_waits
        self.max_loras = max_loras
        self.kv = kv
        self.speculative = speculative
        self.num_drafts = 0  # speculative decoding, cumulative: steps that checked drafts
        self.num_draft_tokens = 0  # ... draft tokens proposed
        self.num_accepted_tokens = 0  # ... and accepted by the model
        # ... accepted at each draft position (vLLM's num_accepted_tokens_per_pos)
        self.num_accepted_per_pos = [0] * (speculative.num_speculative_tokens
                                           if speculative is not None else 0)
        self.priority = config.policy == "priority"
        # most new tokens one request gets in a step (long_prefill_token_threshold; only
        # when prompts may be chunked)
        cap = config.long_prefill_token_threshold
        self._cap = cap if cap > 0 and config.enable_chunked_prefill else 1 << 62
        self.waiting: deque[Request] | PriorityWaitingQueue = (
            PriorityWaitingQueue() if self.priority else deque())
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        # unfinished requests whose sampling needs every earlier token on the host
        self.num_needing_history = 0

    # -- admission -----------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.priority and not self.priority:
            self.config.verify_priority(req.priority)
        total = req.num_prompt_tokens + req.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"prompt ({req.num_prompt_tokens} tokens) + max_tokens ({req.max_tokens}) = "
                f"{total} exceeds max_model_len ({self.config.max_model_len})"
            )
        max_blocks = -(-total // self.kv.block_size)
        if max_blocks > self.kv.num_blocks:
            raise ValueError(
                f"request needs up to {max_blocks} KV blocks ({total} tokens) but the cache holds "
                f"only {self.kv.num_blocks} blocks ({self.kv.num_blocks * self.kv.block_size} tokens)"
            )
        if (
            self.config.max_waiting_requests is not None
            and len(self.waiting) >= self.config.max_waiting_requests
        ):
            raise QueueFullError(f"waiting queue is full ({len(self.waiting)} requests)")
        self.requests[req.request_id] = req
        self.waiting.append(req)
        if req.needs_host_history:
            self.num_needing_history += 1

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            aborted.append(req)
        return aborted

    def fail_request(self, req: Request) -> None:
        """Finish an unscheduled request that cannot run (its grammar failed to compile);
        the engine core reports why."""
        if not req.is_finished and self.requests.get(req.request_id) is req:
            self._finish(req, RequestStatus.FINISHED_ABORTED)

    # -- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        now = time.monotonic()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            owed = req.num_tokens + req.num_placeholders - req.num_computed_tokens
            if owed <= 0 or (req.num_placeholders and self._will_stop_by_length(req)):
                i += 1  # nothing owed, or the in-flight token is its last one
                continue
            n = min(owed, budget, self._cap)
            draft = self._draft(req, budget) if owed == 1 else []
            n += len(draft)
            while True:
                block_ids = self.kv.allocate_slots(req, n)
                if block_ids is not None:
                    break
                if draft:  # no room for the drafts: decode plainly before preempting anyone
                    n -= len(draft)
                    draft = []
                    continue
                if self.priority:
                    victim, i, given_back = self._pop_priority_victim(i, out)
                    budget += given_back
                else:
                    victim = self.running.pop()  # newest running request
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            if block_ids is None:
                # req itself was preempted; with fcfs it was the last running request, with
                # priority the ones after it (now from index i) go on
                continue
            if draft:
                out.scheduled.append(self._scheduled_spec(req, draft, block_ids))
            else:
                out.scheduled.append(self._scheduled(req, n, block_ids))
            budget -= n
            i += 1

        # admit waiting requests (not in a step that had to preempt: the cache is full)
        prefilling = self._prefilling_first_blocks()
        loras = self._running_loras() if self.max_loras is not None else None
        deferred: list[Request] = []
        while (
            self.waiting
            and budget > 0
            and not out.preempted_ids
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting.popleft()
            if req.status is RequestStatus.WAITING_FOR_FSM:
                # its grammar is still compiling (off the loop): the others go on meanwhile
                deferred.append(req)
                continue
            if req.num_placeholders:
                # preempted while a step of it was in flight: wait for that step's token
                deferred.append(req)
                continue
            if loras is not None and self._lora_waits(req, loras):
                deferred.append(req)
                continue
            first = self._first_block_hash(req)
            if first is not None and first in prefilling:
                # a request with the same leading block is mid-prefill: wait one step and
                # share its blocks instead of computing them twice (n > 1, shared prompts)
                deferred.append(req)
                continue
            computed_blocks, num_cached = ([], 0)
            if req.num_computed_tokens == 0:
                computed_blocks, num_cached = self.kv.get_computed_blocks(req)
            n = req.num_tokens - req.num_computed_tokens - num_cached
            if not self.config.enable_chunked_prefill and n > budget:
                self.waiting.appendleft(req)
                break
            n = min(n, budget, self._cap)
            block_ids = self.kv.allocate_slots(req, n, computed_blocks)
            if block_ids is None:
                self.waiting.appendleft(req)
                break
            req.num_computed_tokens += num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._scheduled(req, n, block_ids))
            budget -= n
            if first is not None and num_cached == 0:
                prefilling.add(first)  # its siblings can share once this prefill is done
        self.waiting.extendleft(reversed(deferred))

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _pop_priority_victim(self, i: int, out: SchedulerOutput) -> tuple[Request, int, int]:
        """Remove from the running list the request of largest (priority, arrival time);
        returns it, the index of the running request being scheduled after the removal, and
        the tokens given back if the victim was already scheduled in this step."""
        j, victim = max(enumerate(self.running), key=lambda e: _queue_key(e[1]))
        del self.running[j]
        given_back = 0
        if j < i:
            i -= 1
            for k, s in enumerate(out.scheduled):
                if s.request is victim:  # scheduled earlier in this step: take it back
                    del out.scheduled[k]
                    given_back = s.num_tokens
                    if s.sample:
                        victim.num_placeholders -= 1
                    break
        return victim, i, given_back

    def _running_loras(self) -> set:
        return {r.lora_request.key for r in self.running if r.lora_request is not None}

    def _lora_waits(self, req: Request, loras: set) -> bool:
        """Whether req's adapter would be one more than max_loras in this step (vLLM's
        rule): it waits, the base model's requests and other adapters' go on. Admitting it
        adds its adapter to ``loras``."""
        if req.lora_request is None:
            return False
        key = req.lora_request.key
        if key in loras:
            return False
        if len(loras) >= self.max_loras:
            return True
        loras.add(key)
        return False

    def _first_block_hash(self, req: Request):
        """Hash of req's first full block if it could be shared through the prefix cache."""
        if (
            not self.kv.enable_prefix_caching
            or req.num_computed_tokens > 0
            or req.num_tokens <= self.kv.block_size
            or req.computes_whole_prompt
        ):
            return None
        return self.kv.first_block_hash(req)

    def _prefilling_first_blocks(self) -> set:
        """First-block hashes of running requests that have not computed their first block.

        Only the first block: waiting for a whole long chunked prefill would cost a sibling
        more latency than recomputing the blocks it could not share.
        """
        out = set()
        for r in self.running:
            if r.num_computed_tokens < self.kv.block_size < r.num_tokens:
                h = self.kv.first_block_hash(r)
                if h is not None:
                    out.add(h)
        return out

    def _scheduled(self, req: Request, n: int, block_ids: list[int]) -> ScheduledRequest:
        start = req.num_computed_tokens
        sample = start + n == req.num_tokens + req.num_placeholders
        req.num_computed_tokens += n
        if sample:
            req.num_placeholders += 1
        return ScheduledRequest(
            request=req, start=start, num_tokens=n, block_ids=block_ids, sample=sample
        )

    def _draft(self, req: Request, budget: int) -> list[int]:
        """Draft tokens for a decoding request (speculative decoding), within what it may
        still generate, max_model_len and the step's token budget."""
        spec = self.speculative
        if spec is None or req.num_placeholders or req.no_speculation:
            return []
        if spec.disable_by_batch_size is not None and len(self.running) > spec.disable_by_batch_size:
            return []
        room = min(spec.num_speculative_tokens, budget - 1,
                   req.max_tokens - req.num_output_tokens - 1,
                   self.config.max_model_len - req.num_tokens)
        if room <= 0:
            return []
        if spec.model is not None:  # the runner's draft model fills them in
            return [-1] * room
        return ngram.propose(req.all_token_ids, room, spec.prompt_lookup_max, spec.prompt_lookup_min)

    def _scheduled_spec(self, req: Request, draft: list[int], block_ids: list[int]) -> ScheduledRequest:
        start = req.num_computed_tokens
        req.num_computed_tokens += 1 + len(draft)
        req.num_placeholders += 1
        return ScheduledRequest(request=req, start=start, num_tokens=1 + len(draft),
                                block_ids=block_ids, sample=True, spec_token_ids=draft)

    def _will_stop_by_length(self, req: Request) -> bool:
        """Whether the tokens in flight already take req to max_tokens or max_model_len."""
        return (
            req.num_output_tokens + req.num_placeholders >= req.max_tokens
            or req.num_tokens + req.num_placeholders >= self.config.max_model_len
        )

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the model ran ---------------------------------------------------------------
    def update(
        self, out: SchedulerOutput, sampled: dict[str, int],
        spec_tokens: dict[str, list[int]] | None = None,
        pooled: dict | None = None,
    ) -> list[tuple[Request, list[int]]]:
        """Advance requests by what ran; returns (request, new token ids) for those that moved.

        sampled: the new token of each sampling request; spec_tokens: for a request scheduled
        with drafts, the accepted drafts followed by the model's next token; pooled: given
        by a pooling runner, whose requests finish once their whole prompt ran (prefill only).
        Requests that finished have their status set and their blocks freed.
        """
        progressed: list[tuple[Request, list[int]]] = []
        now = time.monotonic()
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted (or stopped) while the step ran: drop its token
                continue
            if not s.sample:
                self.kv.cache_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))
                progressed.append((req, []))
                continue
            if pooled is not None:  # a pooling engine: the prompt is done, so is the request
                req.num_placeholders -= 1
                self._finish(req, RequestStatus.FINISHED_STOPPED)
                progressed.append((req, []))
                continue
            if s.spec_token_ids:
                progressed.append((req, self._accept(req, s, (spec_tokens or {})[req.request_id], now)))
                continue
            token = sampled[req.request_id]
            req.num_placeholders -= 1
            if req.reasoning is not None:
                if token == req.reasoning.end_id:  # the reasoning ends: grammar from the next
                    req.reasoning = None
            elif req.grammar is not None and not self._grammar_accepts(req, token):
                # never emit a token outside the grammar: this happens only when other masks
                # (allowed_token_ids, bad_words, logit_bias) left the grammar no token at all
                logger.warning("request %s: sampled token %d is outside its grammar; finishing "
                               "it without that token", req.request_id, token)
                req.stop_reason = None
                self._finish(req, RequestStatus.FINISHED_STOPPED)
                progressed.append((req, []))
                continue
            req.append_output_token(token)
            self.kv.cache_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))
            if req.first_token_time is None:
                req.first_token_time = now
            status = self._check_stop(req, token)
            if req.active_grammar is not None and req.grammar.is_terminated():
                # the grammar accepted a stop token: done, even under min_tokens (the sampler
                # lets the grammar's stop through when it allows nothing else)
                req.stop_reason = None if status is None else req.stop_reason
                status = RequestStatus.FINISHED_STOPPED
            if status is not None:
                self._finish(req, status)
            progressed.append((req, [token]))
        return progressed

    def _accept(self, req: Request, s: ScheduledRequest, tokens: list[int], now: float) -> list[int]:
        """Append a speculative step's tokens (accepted drafts + the model's next one) up to
        the first that stops the request; returns those appended."""
        accepted = len(tokens) - 1
        self.num_drafts += 1
        self.num_draft_tokens += len(s.spec_token_ids)
        self.num_accepted_tokens += accepted
        for pos in range(accepted):
            self.num_accepted_per_pos[pos] += 1
        req.num_placeholders -= 1
        req.num_computed_tokens = s.start + 1 + accepted  # KV of rejected drafts is stale
        if req.first_token_time is None:
            req.first_token_time = now
        appended = []
        for token in tokens:
            req.append_output_token(token)
            appended.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self._finish(req, status)
                return appended
        self.kv.cache_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))
        return appended

    @staticmethod
    def _grammar_accepts(req: Request, token: int) -> bool:
        """Feed a sampled token to the request's grammar matcher; False if it refuses it."""
        return not req.grammar.is_terminated() and req.grammar.accept_token(token)

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.sampling_params
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if p.stop_token_ids and token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req.needs_host_history:
            self.num_needing_history -= 1
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)

    # -- state ---------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)


def _queue_key(req: Request) -> tuple[int, float, str]:
    return (req.priority, req.arrival_time, req.request_id)


class PriorityWaitingQueue:
    """The waiting queue of the priority policy: a heap by (priority, arrival time, request
    id), with the deque methods the scheduler calls. A request put back at the "front"
    (preempted, or not admitted in this step) takes its place by its key like any other."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, str, Request]] = []

    def append(self, req: Request) -> None:
        heapq.heappush(self._heap, (*_queue_key(req), req))

    appendleft = append

    def extendleft(self, reqs: Iterable[Request]) -> None:
        for r in reqs:
            self.append(r)

    def popleft(self) -> Request:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        return heapq.heappop(self._heap)[-1]

    def remove(self, req: Request) -> None:
        for k, e in enumerate(self._heap):
            if e[-1] is req:
                last = self._heap.pop()
                if k < len(self._heap):
                    self._heap[k] = last
                    heapq.heapify(self._heap)
                return
        raise ValueError("request not in the waiting queue")

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self):
        """In admission order."""
        return (e[-1] for e in sorted(self._heap, key=lambda e: e[:3]))

    def __getitem__(self, k: int) -> Request:
        return list(self)[k]


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests: the caller should retry later (HTTP 503)."""
