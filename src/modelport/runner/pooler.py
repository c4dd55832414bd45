"""The pooler of a pooling (embedding) runner: final-norm hidden states -> one vector each.

A request's prompt may run in several chunks (chunked prefill): LAST takes the last prompt
token's row of the final chunk; MEAN sums every chunk's rows (float32) and divides by the
prompt length; CLS keeps the first token's row. The embedding head then keeps the first
``dimensions`` values (matryoshka) and L2-normalizes, in that order, as vLLM's embedding head
does. A classification model's pooled rows go through its ``classify`` head (one matmul for
the step's finished requests), then softmax, or sigmoid for one label or a multi-label
``problem_type``, as vLLM's classifier pooler (``use_activation=False``: the raw logits).

Per-token tasks give one row per prompt token, as vLLM's token poolers: ``token_embed`` an
embedding model's final hidden state of each token (its first ``dimensions`` values with a
matryoshka ``dimensions``, then L2-normalized each unless ``normalize=False``), ``token_classify`` a classifier's head on each token's row
(``classify_tokens``), then the same softmax / sigmoid as its sequence output. A model with
its own per-token heads (BGE-M3: models/bge_m3.py, ``token_tasks``) maps the rows itself. A
decoder's prompt may come in chunks: the rows are kept (float32) until its last chunk; such
a request never reads the prefix cache (Request.computes_whole_prompt), so its first chunk
starts at token 0. Every result crosses processes as flat floats; a token task's shape
[n, d] goes with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modelport.engine.scheduler import ScheduledRequest, SchedulerOutput
from modelport.pooling_params import TOKEN_TASKS, PoolerConfig, PoolingParams


class Pooler:
    def __init__(self, config: PoolerConfig) -> None:
        self.pooling_type = config.pooling_type
        self.task = config.task
        # MEAN: running float32 sums; CLS: the first token's row (request id -> tensor)
        self._partial: dict[str, torch.Tensor] = {}
        self._classify = None  # the model's classify(pooled [N, H]) -> logits [N, L]
        self._sigmoid = False
        self._model: torch.nn.Module | None = None
        self._token_tasks = config.token_tasks
        self._own_heads = False  # the model maps token rows itself (BGE-M3's token_* heads)
        self._classify_tokens = None  # a classifier's head on each token's row
        # per-token tasks of a chunked prompt: its rows so far (request id -> float32 chunks)
        self._token_parts: dict[str, list[torch.Tensor]] = {}

    def bind(self, model: torch.nn.Module) -> None:
        """Take the loaded model's heads: a "classify" pooler's classification head (and its
        per-token form for token_classify), and the per-token heads of a model that has its
        own (ValueError if one the engine config promised did not load)."""
        self._model = model
        own = getattr(model, "token_tasks", None)
        self._own_heads = own is not None
        lost = [t for t in self._token_tasks if self._own_heads and t not in own]
        if lost:
            raise ValueError(f"{type(model).__name__}: the head(s) for {', '.join(lost)} did "
                             "not load")
        if self.task != "classify":
            return
        head = getattr(model, "classify", None)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no classification head")
        self._classify = head
        if "token_classify" in self._token_tasks and not self._own_heads:
            self._classify_tokens = getattr(model, "classify_tokens", None)
            if self._classify_tokens is None:
                raise ValueError(f"{type(model).__name__}: its classification head cannot "
                                 "run per token (token_classify)")
        cfg = getattr(model, "config", None)
        problem = (getattr(cfg, "hf_config", None) or {}).get("problem_type")
        self._sigmoid = model.num_labels == 1 or problem == "multi_label_classification"

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._partial.pop(rid, None)
            self._token_parts.pop(rid, None)

    def __call__(self, so: SchedulerOutput, hidden: torch.Tensor, qsl: list[int]
                 ) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
        """Pooled outputs of the requests whose prompt ends in this step, as flat floats,
        and the [n, d] shape of each per-token one."""
        kind = self.pooling_type
        done: list[tuple[str, torch.Tensor, object]] = []
        rows: dict[str, torch.Tensor] = {}
        for i, s in enumerate(so.scheduled):
            rid = s.request_id
            lo, hi = qsl[i], qsl[i + 1]
            p = s.request.pooling_params
            if p is not None and p.task in TOKEN_TASKS:
                whole = self._token_prompt(s, hidden[lo:hi])
                if whole is not None:
                    rows[rid] = self._token_rows(s, p, whole)
                continue
            if kind == "MEAN":
                part = hidden[lo:hi].float().sum(dim=0)
                if s.start > 0 and rid in self._partial:
                    part = part + self._partial[rid]
                self._partial[rid] = part
            elif kind == "CLS" and s.start == 0:
                self._partial[rid] = hidden[lo].float()
            if not s.sample:
                continue
            if kind == "LAST":
                vec = hidden[hi - 1].float()
            elif kind == "MEAN":
                vec = self._partial.pop(rid) / s.request.num_prompt_tokens
            else:
                vec = self._partial.pop(rid)
            done.append((rid, vec, s.request.pooling_params))
        shapes = {rid: list(t.shape) for rid, t in rows.items()}
        if not done:
            return self._flat(rows), shapes
        if self._classify is not None:
            return {**self._classified(done), **self._flat(rows)}, shapes
        out = dict(rows)
        for rid, vec, p in done:
            if p is not None and p.dimensions is not None:
                vec = vec[: p.dimensions]
            if p is None or p.normalize is not False:
                vec = F.normalize(vec, p=2, dim=-1)
            out[rid] = vec
        return self._flat(out), shapes

    def _token_prompt(self, s: ScheduledRequest, hidden: torch.Tensor) -> torch.Tensor | None:
        """A per-token request's rows of its whole prompt once its last chunk ran (None
        before): a chunk's rows are kept as float32 copies until then."""
        rid = s.request_id
        if s.start == 0:
            self._token_parts.pop(rid, None)
        elif rid not in self._token_parts:
            raise RuntimeError(f"request {rid}: a per-token pooling task needs every prompt "
                               f"token's hidden state, but its prompt starts at {s.start}")
        if s.start == 0 and s.sample:
            return hidden
        self._token_parts.setdefault(rid, []).append(hidden.to(torch.float32, copy=True))
        if not s.sample:
            return None
        parts = self._token_parts.pop(rid)
        whole = torch.cat(parts)
        if whole.shape[0] != s.request.num_prompt_tokens:
            raise RuntimeError(f"request {rid}: {whole.shape[0]} rows for a prompt of "
                               f"{s.request.num_prompt_tokens} tokens")
        return whole

    def _token_rows(self, s: ScheduledRequest, p: PoolingParams, hidden: torch.Tensor
                    ) -> torch.Tensor:
        """A token task's [n, d] rows: the model's own head for it, else the hidden states
        (token_embed) or the classifier on each (token_classify)."""
        if p.task not in self._token_tasks:
            raise ValueError(f"pooling task {p.task!r} is not supported by this model")
        ids = s.request.prompt_token_ids
        if self._own_heads and p.task == "token_classify":
            return self._model.token_classify(hidden, ids, p.use_activation is not False)
        if p.task == "token_embed":
            if self._own_heads:
                rows = self._model.token_embed(hidden, ids, p.dimensions is None
                                               and p.normalize is not False)
                if p.dimensions is None:
                    return rows
            else:
                rows = hidden.float()
            if p.dimensions is not None:  # matryoshka: each row's first values
                rows = rows[:, : p.dimensions]
            return F.normalize(rows, p=2, dim=-1) if p.normalize is not False else rows
        logits = self._classify_tokens(hidden)
        if p.use_activation is False:
            return logits
        return torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, dim=-1)

    @staticmethod
    def _flat(out: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        """Each tensor as flat floats, in one device-to-host copy for the step."""
        if not out:
            return {}
        flat = torch.cat([t.reshape(-1) for t in out.values()]).cpu().tolist()
        result, off = {}, 0
        for rid, t in out.items():
            n = t.numel()
            result[rid] = flat[off : off + n]
            off += n
        return result

    def _classified(self, done: list[tuple[str, torch.Tensor, object]]) -> dict[str, list[float]]:
        logits = self._classify(torch.stack([vec for _, vec, _ in done]))
        act = torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, dim=-1)
        use = torch.tensor([p is None or p.use_activation is not False for _, _, p in done],
                           device=logits.device)
        rows = torch.where(use[:, None], act, logits).cpu().tolist()
        return {rid: row for (rid, _, _), row in zip(done, rows)}
