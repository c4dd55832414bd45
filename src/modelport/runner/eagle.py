"""EAGLE proposals: the head (EAGLE-1: models/eagle_llama.py, EAGLE-3: models/eagle3_llama.py)
beside the target on the same KV block tables, in the draft model's KV cache slots
(ModelRunner.draft_kv_caches). The heads differ only in what they read of the target's
forward (``target_features``) and in how their output becomes a token; this file is the same
for both.

Alignment (as vLLM's EAGLE proposer): the head's row at position p reads the token at p + 1
and the target's features at p, and its output predicts the token at p + 2. So the head
lags the target by one position, and needs the target's hidden states from the step before:
``keep()`` holds each request's rows of a step's target forward, and the next step's
``propose()`` first runs the head over the positions whose tokens turned out right (from
that step's start up to the new start: a speculative step's rejected drafts are dropped),
which also overwrites the head KV its draft passes wrote there with the target's features.
Then one pass a draft: the head's own output is the next row's hidden state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from modelport.engine.scheduler import SchedulerOutput
from modelport.runner.sampler import greedy_tokens

if TYPE_CHECKING:
    from modelport.runner.model_runner import ModelRunner


class EagleProposer:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.head = runner.draft_model
        # request id -> (first position, the head's input from the target's step before)
        self.kept: dict[str, tuple[int, torch.Tensor]] = {}

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.kept.pop(rid, None)

    def keep(self, so: SchedulerOutput, hidden: torch.Tensor, qsl: list[int]) -> None:
        """Hold each request's rows of the head's input from the target's forward."""
        hidden = self.head.target_features(hidden)
        for i, s in enumerate(so.scheduled):
            self.kept[s.request_id] = (s.start, hidden[qsl[i] : qsl[i + 1]])

    def propose(self, so: SchedulerOutput) -> None:
        """Catch the head up with the target, then replace the scheduler's placeholders in
        ``spec_token_ids`` with the head's greedy drafts."""
        r = self.runner
        bs = r.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        features: list[torch.Tensor] = []
        drafting: list[tuple] = []  # (scheduled, its last row of the catch-up pass)
        for s in so.scheduled:
            start, rows = self.kept.pop(s.request_id, (s.start, None))
            # positions start .. s.start - 1 of the last step held tokens that were kept
            n = s.start - start if rows is not None and s.start <= start + rows.shape[0] else 0
            if n <= 0:
                if s.spec_token_ids:  # unreachable after any step of the request: no
                    # features to draft from, so a harmless proposal (the last token again)
                    s.spec_token_ids[:] = [s.request.all_token_ids[s.start]] * len(s.spec_token_ids)
                continue
            span = range(start, s.start)
            ids.extend(s.request.all_token_ids[start + 1 : s.start + 1])
            positions.extend(span)
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in span)
            qsl.append(qsl[-1] + n)
            seq_lens.append(s.start)
            tables.append(s.block_ids)
            features.append(rows[:n])
            if s.spec_token_ids:
                drafting.append((s, qsl[-1] - 1))
        if not features:
            return
        out = r._draft_forward(ids, positions, slots, qsl, seq_lens, tables,
                               hidden=torch.cat(features))
        if not drafting:
            return
        head = self.head

        def tokens_of(h: torch.Tensor) -> torch.Tensor:  # greedy, as target token ids
            return head.target_ids(greedy_tokens(head.compute_logits(h).float()))

        h = out[r._to_dev(torch.tensor([row for _, row in drafting]))]
        latest = tokens_of(h)
        proposed = [latest]  # proposed[j][i]: draft j of request i
        longest = max(len(s.spec_token_ids) for s, _ in drafting)
        for j in range(1, longest):  # draft j sits at s.start + j - 1 (one behind the target)
            active = [i for i, (s, _) in enumerate(drafting) if len(s.spec_token_ids) > j]
            scheds = [drafting[i][0] for i in active]
            at = r._to_dev(torch.tensor(active))
            span = [s.start + j - 1 for s in scheds]
            out = r._draft_forward(
                latest[at], span, [s.block_ids[p // bs] * bs + p % bs for s, p in zip(scheds, span)],
                list(range(len(active) + 1)), [p + 1 for p in span], [s.block_ids for s in scheds],
                hidden=h[at])
            latest, h = latest.clone(), h.clone()
            latest[at] = tokens_of(out)
            h[at] = out
            proposed.append(latest)
        table = torch.stack(proposed).tolist()  # the step's one wait for the head
        for i, (s, _) in enumerate(drafting):
            s.spec_token_ids[:] = [table[j][i] for j in range(len(s.spec_token_ids))]
