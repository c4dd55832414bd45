"""The frontend halves of a request: text in -> EngineCoreRequest, EngineCoreOutput -> text out.

They live in the process that talks to users (the server or the offline LLM), so tokenizing,
detokenizing and stop-string matching never stall the engine's model steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from modelport.config import ModelConfig, SchedulerConfig
from modelport.engine.messages import (
    BAD_WORDS_KEY,
    EngineCoreOutput,
    EngineCoreRequest,
    TokenLogprobs,
    params_to_dict,
)
from modelport.frontend.prompts import PromptInput, parse_prompt
from modelport.lora.request import LoRARequest
from modelport.outputs import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    shallow_copy,
)
from modelport.sampling_params import SamplingParams, num_logprobs


def max_tokens_too_large(max_tokens: int, max_model_len: int, n_prompt: int) -> str:
    """vLLM's words for a prompt plus max_tokens past max_model_len (its servers' 400)."""
    return (
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
        f"maximum context length is {max_model_len} tokens and your request has {n_prompt} "
        f"input tokens ({max_tokens} > {max_model_len} - {n_prompt})."
    )


def child_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{index}_{parent_id}"


def tokenize_bad_words(bad_words: list[str], tokenizer, vocab: int) -> list[list[int]]:
    """vLLM's bad_words as token id sequences: each word (leading whitespace dropped) as it
    tokenizes at the start of a text, and, where that differs, after a space (mid-text);
    the spaced form counts only when it is as many tokens as the plain one and starts with
    another token. ValueError for a word of no tokens or ids outside the vocabulary."""
    if tokenizer is None:
        raise ValueError("bad_words needs the model's tokenizer, and this engine has none")
    out: list[list[int]] = []
    for word in bad_words:
        plain = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not plain:
            raise ValueError(f"bad_words entries must tokenize to at least one token, "
                             f"got {word!r}")
        out.append(plain)
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and len(spaced) == len(plain) and spaced[0] != plain[0]:
            out.append(spaced)
    outside = sorted({t for w in out for t in w if not 0 <= t < vocab})
    if outside:
        raise ValueError(f"The model vocabulary size is {vocab}, but the following tokens were "
                         f"specified as bad: {outside[:5]}. All token id values should be "
                         f"integers satisfying: 0 <= token_id < {vocab}.")
    return out


DEFAULT_MAX_LOGPROBS = 20  # vLLM's max_logprobs default (and OpenAI's top_logprobs limit)


def logprobs_over_limit(what: str, k: int | None, max_logprobs: int, vocab: int) -> str | None:
    """vLLM's rule for `what` ("sample" or "prompt") logprobs k (-1: the vocabulary's size):
    at most max_logprobs (-1: no cap). Its message naming the resolved count, or None."""
    limit = num_logprobs(max_logprobs, vocab)
    if k and num_logprobs(k, vocab) > limit:
        return (f"Requested {what} logprobs of {num_logprobs(k, vocab)}, which is greater than "
                f"max allowed: {limit}")
    return None


class InvalidField(ValueError):
    """A request field refused for this model (its vocabulary, the logprobs limit); `param`
    names the field, for the OpenAI error's `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_continue_final(last_role: str | None, add_generation_prompt: bool) -> None:
    """What continuing a chat's final message needs (vLLM's rules), for LLM.chat and the
    server alike: no generation prompt after it, and an assistant message to continue."""
    if add_generation_prompt:
        raise InvalidField(
            "continue_final_message",
            "continue_final_message and add_generation_prompt cannot both be true: set "
            "add_generation_prompt to false to continue the final message",
        )
    if last_role != "assistant":
        raise InvalidField(
            "messages",
            "continue_final_message needs the final message to be the assistant's (the text "
            f"to continue); it is {last_role!r}",
        )


def check_max_logprobs(params: SamplingParams, max_logprobs: int, vocab: int) -> None:
    for what, k in (("sample", params.logprobs), ("prompt", params.prompt_logprobs)):
        why = logprobs_over_limit(what, k, max_logprobs, vocab)
        if why is not None:
            raise InvalidField("logprobs" if what == "sample" else "prompt_logprobs", why)


class InputProcessor:
    def __init__(self, tokenizer, model_config: ModelConfig, scheduler_config: SchedulerConfig,
                 max_logprobs: int = DEFAULT_MAX_LOGPROBS,
                 logits_processors: tuple[type, ...] = ()) -> None:
        self.tokenizer = tokenizer
        # the engine's custom logits processor classes: their validate_params vet requests
        self.logits_processors = logits_processors
        self.model_config = model_config
        self.max_model_len = scheduler_config.max_model_len
        self.scheduler_config = scheduler_config
        self.max_logprobs = max_logprobs

    def tokenize(self, prompt: PromptInput, add_special_tokens: bool = True) -> list[int]:
        return self.prompt_inputs(prompt, None, add_special_tokens)[1]

    def prompt_inputs(
        self, prompt: PromptInput, params: SamplingParams | None, add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """A prompt in any of the offline API's forms -> (its text if known, its token ids),
        truncated as ``params.truncate_prompt_tokens`` asks. ValueError if invalid."""
        parsed = parse_prompt(prompt)
        ids = parsed.token_ids
        if ids is None:
            ids = self.tokenizer.encode(parsed.text, add_special_tokens=add_special_tokens)
        if params is not None and params.truncate_prompt_tokens is not None:
            ids = self.truncate(ids, params.truncate_prompt_tokens)
        return parsed.text, ids

    def truncate(self, prompt_token_ids: list[int], keep: int) -> list[int]:
        """The last ``keep`` ids (-1: the model's max length), as vLLM's truncate_prompt_tokens."""
        if keep == -1:
            keep = self.max_model_len
        elif keep < 1:
            raise ValueError(f"truncate_prompt_tokens must be -1 (max_model_len) or >= 1, got {keep}")
        elif keep > self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens ({keep}) is greater than max_model_len "
                f"({self.max_model_len}); give a smaller value, or -1 for max_model_len"
            )
        from modelport.models.encoder_config import is_encoder

        if is_encoder(self.model_config.architecture) and len(prompt_token_ids) > keep:
            # an encoder reads [CLS] first: cut the end, keep the closing [SEP] / </s>
            # (the tokenizer's own right-side truncation for one text; a scored pair is
            # truncated when it is tokenized, modelport/scoring.py)
            return list(prompt_token_ids[: keep - 1]) + list(prompt_token_ids[-1:])
        return list(prompt_token_ids[-keep:])

    def process(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cap_max_tokens: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> list[EngineCoreRequest]:
        """Validate and fan out into n engine requests (children share the prompt's KV blocks).

        A prompt that leaves no room for one new token is a ValueError. Where the prompt plus
        max_tokens passes max_model_len, ``cap_max_tokens`` (the offline LLM, as vLLM's)
        generates up to max_model_len and finishes with "length"; otherwise (the servers,
        which answer 400 as vLLM's does) it is a ValueError."""
        if priority:
            self.scheduler_config.verify_priority(priority)
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise InvalidField("prompt", "prompt is empty: it must contain at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidField("prompt", f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        check_max_logprobs(params, self.max_logprobs, vocab)
        if self.logits_processors:
            from modelport.logits_processor import validate_request

            validate_request(self.logits_processors, params)  # a refused argument: ValueError
        if params.logit_bias:
            outside = sorted(t for t in params.logit_bias if t >= vocab)
            if outside:
                raise InvalidField("logit_bias", f"token_id(s) {outside[:5]} in logit_bias "
                                   f"contain out-of-vocab token ids. Vocabulary size: {vocab}")
        if params.allowed_token_ids is not None:
            if not params.allowed_token_ids:
                raise InvalidField("allowed_token_ids", "allowed_token_ids is not None and empty!")
            outside = sorted({t for t in params.allowed_token_ids if t >= vocab})
            if outside:
                raise InvalidField("allowed_token_ids", f"allowed_token_ids contains "
                                   f"out-of-vocab token id! {outside[:5]} (vocabulary size: {vocab})")
        bad_words = (tokenize_bad_words(params.bad_words, self.tokenizer, vocab)
                     if params.bad_words else None)
        if params.structured_outputs is not None:
            from modelport.engine.structured_output import validate

            validate(params.structured_outputs)  # a bad schema / regex / grammar: ValueError
        limit = self.max_model_len
        if n_prompt > limit:
            raise ValueError(
                f"The decoder prompt (length {n_prompt}) is longer than the maximum model length "
                f"of {limit}. Make sure that `max_model_len` is no smaller than the number of "
                "text tokens."
            )
        if n_prompt == limit:
            raise ValueError(
                f"The decoder prompt (length {n_prompt}) plus the number of requested output "
                f"tokens (at least 1) is longer than the maximum model length of {limit}. Make "
                "sure that `max_model_len` is no smaller than the number of text tokens (prompt "
                "+ requested output tokens)."
            )
        max_tokens = params.max_tokens
        if max_tokens is None or (cap_max_tokens and n_prompt + max_tokens > limit):
            max_tokens = limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise ValueError(max_tokens_too_large(max_tokens, limit, n_prompt))
        base = params_to_dict(params)
        base["max_tokens"] = max_tokens
        base["n"] = 1
        if bad_words:
            base[BAD_WORDS_KEY] = bad_words
        eos = list(self.tokenizer.eos_token_ids) if self.tokenizer is not None else list(
            self.model_config.eos_token_ids)
        t = time.monotonic() if arrival_time is None else arrival_time
        reqs = []
        for i in range(params.n):
            d = dict(base)
            if params.seed is not None:
                d["seed"] = (params.seed + i + 2**63) % 2**64 - 2**63  # stays in int64
            reqs.append(EngineCoreRequest(
                request_id=child_id(request_id, i, params.n),
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=d,
                eos_token_ids=eos,
                arrival_time=t,
                priority=priority,
                lora_request=lora_request,
            ))
        return reqs


@dataclass
class _ChildState:
    index: int
    detok: object  # IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    text: str = ""  # visible text (stop string handled)
    # text length while the output is within min_tokens: a stop string ending at or before
    # it does not count (vLLM: no stop string stops a request before min_tokens tokens)
    stop_floor: int = 0
    emitted: int = 0  # chars of text already sent (delta mode)
    sent_tokens: int = 0  # token ids already sent (delta mode)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_kind: str  # "cumulative" | "delta" | "final"
    children: dict[str, _ChildState]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    num_finished: int = 0


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # vLLM: the end ids other than the tokenizer's own eos (generation_config.json's,
        # config.json's) stop as stop_token_ids do, so stop_reason names the id
        primary = getattr(getattr(tokenizer, "hf", None), "eos_token_id", None)
        self._other_eos = frozenset(getattr(tokenizer, "eos_token_ids", ())) - {primary}
        self.parents: dict[str, _ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
        params: SamplingParams, output_kind: str = "final", arrival_time: float | None = None,
    ) -> None:
        from modelport.frontend.detokenizer import IncrementalDetokenizer, NoDetokenizer

        children = {}
        for i in range(params.n):
            cid = child_id(request_id, i, params.n)
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                            params.skip_special_tokens)
                     if params.detokenize else NoDetokenizer())
            children[cid] = _ChildState(
                index=i, detok=detok,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            self.child_to_parent[cid] = request_id
        self.parents[request_id] = _ParentState(
            request_id, prompt, list(prompt_token_ids), params, output_kind, children,
            RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time),
        )

    def has_request(self, request_id: str) -> bool:
        return request_id in self.parents

    def child_ids(self, request_id: str) -> list[str]:
        ps = self.parents.get(request_id)
        return list(ps.children) if ps else []

    def _decode_logprobs(self, tl: TokenLogprobs, detokenize: bool = True) -> dict[int, Logprob]:
        d: dict[int, Logprob] = {}
        for tid, lp, rank in zip(tl.token_ids, tl.logprobs, tl.ranks):
            if tid not in d:
                text = self.tokenizer.decode([tid], skip_special_tokens=False) if detokenize \
                    else None  # vLLM's decoded_token with detokenize=False
                d[tid] = Logprob(lp, rank, text)
        return d

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns RequestOutputs to deliver and child request ids the engine must abort (stop strings)."""
        results: dict[str, RequestOutput] = {}
        to_abort: list[str] = []
        changed: dict[str, list[_ChildState]] = {}
        now = time.monotonic()
        for o in outputs:
            pid = self.child_to_parent.get(o.request_id)
            if pid is None:
                continue
            ps = self.parents[pid]
            c = ps.children[o.request_id]
            if c.finish_reason is not None:
                continue
            ps.num_cached_tokens = max(ps.num_cached_tokens, o.num_cached_tokens)
            m = ps.metrics
            if o.first_scheduled_time and m.first_scheduled_time is None:
                m.first_scheduled_time = o.first_scheduled_time
            if o.new_token_ids:
                if m.first_token_time is None:
                    m.first_token_time = now
                m.last_token_time = now
            if o.prompt_logprobs is not None and ps.prompt_logprobs is None:
                ps.prompt_logprobs = [
                    None if t is None else self._decode_logprobs(t, ps.params.detokenize)
                    for t in o.prompt_logprobs]
            self._update_child(ps, c, o, to_abort)
            changed.setdefault(pid, []).append(c)
        for pid, kids in changed.items():
            ps = self.parents[pid]
            finished = ps.num_finished == len(ps.children)
            if ps.output_kind == "final" and not finished:
                continue
            if finished:  # before the output copies the metrics
                ps.metrics.finished_time = now
            ro = self._make_output(ps, kids, finished)
            if ro is not None:
                results[pid] = ro
            if finished:
                for cid in ps.children:
                    self.child_to_parent.pop(cid, None)
                del self.parents[pid]
        return list(results.values()), to_abort

    def _update_child(self, ps: _ParentState, c: _ChildState, o: EngineCoreOutput, to_abort: list[str]) -> None:
        n = len(o.new_token_ids)
        if n > 1 and ps.params.stop_strings:
            # several tokens at once (speculative decoding): look for the stop strings after
            # each, as one at a time would, so nothing past a stop string is kept
            lps = o.new_logprobs
            for i, t in enumerate(o.new_token_ids):
                last = i == n - 1
                self._update_child_tokens(ps, c, msgspec.structs.replace(
                    o, new_token_ids=[t], new_logprobs=[lps[i]] if lps else None,
                    finish_reason=o.finish_reason if last else None,
                    stop_reason=o.stop_reason if last else None), to_abort)
                if c.finish_reason is not None:
                    return
            return
        self._update_child_tokens(ps, c, o, to_abort)

    def _update_child_tokens(self, ps: _ParentState, c: _ChildState, o: EngineCoreOutput,
                             to_abort: list[str]) -> None:
        p = ps.params
        c.token_ids.extend(o.new_token_ids)
        if o.new_logprobs and c.logprobs is not None:
            for tl in o.new_logprobs:
                c.logprobs.append(self._decode_logprobs(tl, p.detokenize))
                c.cumulative_logprob = (c.cumulative_logprob or 0.0) + tl.logprobs[0]
        old_len = len(c.text)
        text_ids = o.new_token_ids
        if (o.finish_reason == "stop" and text_ids and not isinstance(o.stop_reason, str)
                and not p.include_stop_str_in_output):
            # the core stopped on a stop token (EOS, stop_token_ids, a grammar's end): as in
            # vLLM its id is in token_ids but its text is not, whether special or not
            text_ids = text_ids[:-1]
        c.detok.add(text_ids)
        if o.finish_reason is not None:
            c.detok.flush()  # an incomplete trailing character becomes U+FFFD, as in decode()
        full = c.detok.text
        stops = p.stop_strings
        if len(c.token_ids) <= p.min_tokens:
            c.stop_floor = len(full)
            stops = []
        if stops and o.new_token_ids:
            longest = max(len(s) for s in stops)
            search_from = max(0, old_len - longest + 1)
            hit = None
            for s in stops:
                j = full.find(s, max(search_from, c.stop_floor - len(s) + 1))
                if j != -1 and (hit is None or j < hit[0]):
                    hit = (j, s)
            if hit is not None:
                j, s = hit
                c.text = full[: j + len(s)] if p.include_stop_str_in_output else full[:j]
                c.finish_reason, c.stop_reason = "stop", s
                ps.num_finished += 1
                if o.finish_reason is None:
                    to_abort.append(o.request_id)
                return
        c.text = full
        if o.finish_reason is not None:
            c.finish_reason = o.finish_reason
            c.stop_reason = o.stop_reason
            if (o.finish_reason == "stop" and o.stop_reason is None and o.new_token_ids
                    and o.new_token_ids[-1] in self._other_eos):
                c.stop_reason = o.new_token_ids[-1]
            ps.num_finished += 1

    def _make_output(self, ps: _ParentState, kids: list[_ChildState], finished: bool) -> RequestOutput | None:
        p = ps.params
        holdback = max((len(s) for s in p.stop_strings), default=1) - 1
        outs = []
        if ps.output_kind == "delta":
            for c in sorted(kids, key=lambda c: c.index):
                end = len(c.text) if c.finish_reason is not None else max(c.emitted, len(c.text) - holdback)
                delta_text = c.text[c.emitted:end]
                n_new = c.sent_tokens
                new_ids = c.token_ids[n_new:]
                c.sent_tokens = len(c.token_ids)
                c.emitted = end
                outs.append(CompletionOutput(
                    index=c.index, text=delta_text, token_ids=new_ids,
                    cumulative_logprob=c.cumulative_logprob,
                    logprobs=c.logprobs[n_new:] if c.logprobs is not None else None,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                ))
        else:
            for c in sorted(ps.children.values(), key=lambda c: c.index):
                outs.append(CompletionOutput(
                    index=c.index, text=c.text, token_ids=list(c.token_ids),
                    cumulative_logprob=c.cumulative_logprob,
                    logprobs=list(c.logprobs) if c.logprobs is not None else None,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                ))
        return RequestOutput(
            request_id=ps.request_id, prompt=ps.prompt, prompt_token_ids=ps.prompt_token_ids,
            outputs=outs, finished=finished, prompt_logprobs=ps.prompt_logprobs,
            num_cached_tokens=ps.num_cached_tokens, metrics=shallow_copy(ps.metrics),
        )

    def abort(self, request_id: str) -> list[str]:
        """Forget a parent request; returns its child ids (to abort in the engine)."""
        ps = self.parents.pop(request_id, None)
        if ps is None:
            return []
        for cid in ps.children:
            self.child_to_parent.pop(cid, None)
        return list(ps.children)
