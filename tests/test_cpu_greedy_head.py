"""The exact greedy LM head on CPU (layers/cpu_fast.py Int8GreedyHead, LMHead.greedy): an int8
screen with a provable error bound, then the fp32 refine on the survivors. Its tokens are the
argmax of the logits the bf16 head + fp32 refine gives, and rows that are not plain greedy
never take it."""

from __future__ import annotations

import random

import pytest
import torch

from modelport import LLM, SamplingParams
from modelport.layers import cpu_fast
from modelport.layers.embedding import REFINE_TOPK, LMHead
from modelport.runner.sampler import greedy_tokens


def narrowed_head(table: torch.Tensor) -> LMHead:
    """An LMHead as quantization/loading.narrow_lm_head leaves a tied one: bf16 weight, the
    fp32 table as exact_weight."""
    head = LMHead(*table.shape)
    head.weight = torch.nn.Parameter(table.to(torch.bfloat16), requires_grad=False)
    head.exact_weight = table
    return head


def near_ties(table: torch.Tensor, n: int, seed: int, scale: float = 1.0,
              outlier: int | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """n hidden vectors (random, or rows of ``base`` cycled) whose two largest fp32 logits
    are pulled to within 1e-2..1e-6 of their gap (moved along w_a - w_b); every 8th to an
    exact tie up to rounding."""
    g = torch.Generator().manual_seed(seed)
    if base is None:
        x = torch.randn(n, table.shape[1], generator=g) * scale
        if outlier is not None:  # a massive channel, as after a final norm
            x[:, outlier] *= 20
    else:
        x = base[torch.arange(n) % len(base)].clone()
    for i in range(n):
        logits = table @ x[i]
        a, b = logits.topk(2).indices.tolist()
        d = table[a] - table[b]
        gap = float(logits[a] - logits[b])
        keep = 10.0 ** -float(torch.randint(2, 7, (1,), generator=g)) if i % 8 else 0.0
        x[i] -= (1 - keep) * gap / float(d @ d) * d
    return x


def test_bound_holds_and_catches_a_wrong_int8_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2048, 96, generator=g) * 0.05
    x = near_ties(table, 256, 1, scale=4.0, outlier=5)
    head = cpu_fast.Int8GreedyHead.calibrated(table, x[:8])
    assert 5 in head.outliers.tolist()
    approx, bound = head.screen(x)
    exact = x.double() @ table.double().T
    assert ((approx.double() - exact).abs() <= bound.double()).all()
    cands = head.candidates(x)
    assert cands is not None
    refined = torch.einsum("td,tkd->tk", x, table[None].expand(len(x), -1, -1))
    want = refined.argmax(dim=1)
    wrong = approx.argmax(dim=1) != want
    assert wrong.sum() >= 5  # the screen's argmax alone is wrong on several near-ties...
    for i in range(len(x)):  # ...the candidates always hold the fp32 argmax
        assert int(want[i]) in cands[i].tolist()
    got = cpu_fast.greedy_from_candidates(x, table, cands, REFINE_TOPK)
    assert torch.equal(got, want)
    assert torch.equal(got, greedy_tokens(narrowed_head(table)(x)))


def test_too_many_candidates_falls_back() -> None:
    table = torch.zeros(256, 32)
    table[:, 0] = 1.0  # every logit equal: all 256 rows are candidates
    head = narrowed_head(table)
    assert head.greedy(torch.randn(2, 32)) is None
    assert head.greedy(torch.full((1, 32), float("nan"))) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_random_head_greedy_equals_the_refined_heads_argmax(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(8192, 64, generator=g) * 0.1
    head = narrowed_head(table)
    for rows in (1, 3, 16):
        x = near_ties(table, rows * 16, seed + rows, scale=3.0, outlier=7).view(16, rows, -1)
        for batch in x:
            got = head.greedy(batch)
            assert got is not None
            assert torch.equal(got, greedy_tokens(head(batch)))


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory=64 << 20, max_model_len=1024, max_num_seqs=16)


def test_default_model_head_near_ties(llm, monkeypatch) -> None:
    """Real final hidden states of the embedded model, moved to near-ties of their top two."""
    head = llm.llm_engine.core.runner.model.lm_head
    seen = []
    orig = head.greedy
    monkeypatch.setattr(head, "greedy", lambda h: (seen.append(h.clone()), orig(h))[1])
    llm.generate([{"prompt_token_ids": list(range(1000, 1030))}],
                 SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert head.exact_weight is not None and head.int8_greedy is not None
    x = near_ties(head.exact_weight, 64, 3, base=torch.cat(seen))
    fast = 0
    for rows in (1, 4):
        for batch in x.view(-1, rows, x.shape[1]):
            got = orig(batch)
            if got is not None:
                fast += 1
                assert torch.equal(got, greedy_tokens(head(batch)))
    assert fast >= 64 + 16 - 8  # nearly all took the fast path


def _prompts(llm, n: int) -> list[dict]:
    rng = random.Random(5)
    vocab = llm.llm_engine.config.model_config.vocab_size
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
             "1, 2, 3, 4,", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
             "The quick brown fox", "import numpy as np\n", "Dear Sir or Madam,"]
    tok = llm.get_tokenizer()
    ids = [tok.encode(t) for t in texts]
    ids += [[rng.randrange(vocab) for _ in range(rng.randrange(4, 40))] for _ in range(n - 8)]
    return [{"prompt_token_ids": p} for p in ids[:n]]


def _count_fast(head, monkeypatch) -> list[int]:
    calls = [0, 0]
    orig = head.greedy

    def spy(hidden):
        out = orig(hidden)
        calls[out is None] += 1
        return out

    monkeypatch.setattr(head, "greedy", spy)
    return calls


def test_default_model_greedy_tokens_unchanged(llm, monkeypatch) -> None:
    """16 prompts (8 of random ids) x 32 greedy tokens, batched and one at a time."""
    head = llm.llm_engine.core.runner.model.lm_head
    prompts = _prompts(llm, 16)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    got = {}
    for on in (False, True):
        monkeypatch.setattr(cpu_fast, "GREEDY_INT8_HEAD", on)
        calls = _count_fast(head, monkeypatch)
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        single = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
                  for p in prompts[:4] + prompts[-4:]]
        got[on] = (batched, single)
    assert got[True] == got[False]
    # with the switch on, the fast path answered (nearly) every step: 9 runs x 32 steps
    assert calls[0] + calls[1] == 9 * 32
    assert calls[1] <= 9 * 32 // 20, calls


def test_mixed_and_non_greedy_steps_are_untouched(llm, monkeypatch) -> None:
    """Seeded temperature rows beside greedy ones, logprobs and penalties: the same tokens
    and logprobs with the switch on, and no step of theirs reaches the fast path."""
    head = llm.llm_engine.core.runner.model.lm_head
    prompts = _prompts(llm, 6)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.2, top_p=0.9, seed=3, max_tokens=16,
                             ignore_eos=True)]
    alone = [SamplingParams(temperature=0, logprobs=3, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=8,
                            ignore_eos=True),
             SamplingParams(temperature=0, min_tokens=4, max_tokens=8),
             SamplingParams(temperature=0, logit_bias={11: 5.0}, max_tokens=8,
                            ignore_eos=True)]
    got = {}
    for on in (False, True):
        monkeypatch.setattr(cpu_fast, "GREEDY_INT8_HEAD", on)
        calls = _count_fast(head, monkeypatch)
        mixed = llm.generate(prompts[:4], params, use_tqdm=False)
        res = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in mixed]
        assert calls == [0, 0]
        for sp in alone:
            o = llm.generate([prompts[4]], sp, use_tqdm=False)[0].outputs[0]
            res.append((o.token_ids, o.logprobs))
        assert calls[0] <= 4  # only min_tokens' steps past its ban may take it
        got[on] = res
        monkeypatch.undo()
    assert got[True] == got[False]
