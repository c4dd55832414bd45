"""The pooler of a pooling (embedding) runner: final-norm hidden states -> one vector each.

A request's prompt may run in several chunks (chunked prefill): LAST takes the last prompt
token's row of the final chunk; MEAN sums every chunk's rows (float32) and divides by the
prompt length; CLS keeps the first token's row. The embedding head then keeps the first
``dimensions`` values (matryoshka) and L2-normalizes, in that order, as vLLM's embedding head
does. A classification model's pooled rows go through its ``classify`` head (one matmul for
the step's finished requests), then softmax, or sigmoid for one label or a multi-label
``problem_type``, as vLLM's classifier pooler (``use_activation=False``: the raw logits).

Per-token tasks (``token_classify`` / ``token_embed``, BGE-M3's heads: models/bge_m3.py)
give one row per kept prompt token: the model's head maps the request's rows (its whole
prompt is in one step: encoders run without chunking) to an [n, d] tensor. Every result
crosses processes as flat floats; a token task's shape [n, d] goes with it.
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
        self._model: torch.nn.Module | None = None  # token tasks: its token_* heads
        self._token_tasks = config.token_tasks

    def bind(self, model: torch.nn.Module) -> None:
        """Take the loaded model's heads: a "classify" pooler's classification head, and the
        per-token heads the engine config promised (ValueError if one did not load)."""
        self._model = model
        loaded = tuple(getattr(model, "token_tasks", ()))
        lost = [t for t in self._token_tasks if t not in loaded]
        if lost:
            raise ValueError(f"{type(model).__name__}: the head(s) for {', '.join(lost)} did "
                             "not load")
        if self.task != "classify":
            return
        head = getattr(model, "classify", None)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no classification head")
        self._classify = head
        cfg = getattr(model, "config", None)
        problem = (getattr(cfg, "hf_config", None) or {}).get("problem_type")
        self._sigmoid = model.num_labels == 1 or problem == "multi_label_classification"

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._partial.pop(rid, None)

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
                rows[rid] = self._token_rows(s, p, hidden[lo:hi])
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

    def _token_rows(self, s: ScheduledRequest, p: PoolingParams, hidden: torch.Tensor
                    ) -> torch.Tensor:
        """A token task's [n, d] rows, through the model's head for it."""
        if s.start != 0 or not s.sample:
            raise RuntimeError(f"{p.task} needs each request's whole prompt in one step "
                               "(chunked prefill must be off)")
        if p.task not in self._token_tasks:
            raise ValueError(f"pooling task {p.task!r} is not supported by this model")
        ids = s.request.prompt_token_ids
        if p.task == "token_classify":
            return self._model.token_classify(hidden, ids, p.use_activation is not False)
        return self._model.token_embed(hidden, ids, p.normalize is not False)

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
