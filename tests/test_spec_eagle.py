"""EAGLE-1 speculative decoding: a head fed the target's hidden states proposes the drafts.

The heads are built here with the published layout (fc, layers.0.*, an embed_tokens copy that
is ignored) and random weights; a reference EAGLE forward in plain torch checks what the
engine proposes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.engine.arg_utils import EngineArgs

PROMPTS = ["the cat sat on the mat", "0101010101", "EAGLE heads read features", "zz"]


def write_head(path: Path, cfg: dict, weights: dict[str, torch.Tensor], fmt: str) -> Path:
    """A head checkpoint folder: config.json and the weights as safetensors or .bin."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "bin":
        torch.save(weights, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


def make_eagle_head(path: Path, target: Path, *, seed: int, num_layers: int = 1,
                    hidden_size: int | None = None, fmt: str = "safetensors",
                    fc_bias: bool = True, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """An EAGLE head folder for ``target``: its config.json with fewer layers, random tensors
    (``weights`` replaces them) saved as model.safetensors or pytorch_model.bin."""
    cfg = json.loads((target / "config.json").read_text())
    h = hidden_size or cfg["hidden_size"]
    cfg.update(architectures=["LlamaForCausalLMEagle"], num_hidden_layers=num_layers, hidden_size=h)
    d, nh, kvh, inter = h // cfg["num_attention_heads"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"], cfg["intermediate_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    if weights is None:
        weights = {"fc.weight": rnd(h, 2 * h, std=0.15),
                   "embed_tokens.weight": rnd(cfg["vocab_size"], h)}  # unused: the target's
        if fc_bias:
            weights["fc.bias"] = rnd(h)
        for i in range(num_layers):
            p = f"layers.{i}."
            weights.update({
                p + "self_attn.q_proj.weight": rnd(nh * d, h, std=0.3),
                p + "self_attn.k_proj.weight": rnd(kvh * d, h, std=0.3),
                p + "self_attn.v_proj.weight": rnd(kvh * d, h, std=0.3),
                p + "self_attn.o_proj.weight": rnd(h, nh * d, std=0.3),
                p + "mlp.gate_proj.weight": rnd(inter, h, std=0.3),
                p + "mlp.up_proj.weight": rnd(inter, h, std=0.3),
                p + "mlp.down_proj.weight": rnd(h, inter, std=0.3),
                p + "post_attention_layernorm.weight": 1 + rnd(h),
            })
            if i:  # EAGLE-1: the first layer has no input norm
                weights[p + "input_layernorm.weight"] = 1 + rnd(h)
    return write_head(path, cfg, weights, fmt)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("eagle") / "target", seed=3)


def _llm(model: Path, head: Path | None, k: int = 3, method: str = "eagle", **kw) -> LLM:
    spec = None if head is None else {"method": method, "model": str(head),
                                      "num_speculative_tokens": k}
    return LLM(model=str(model), device="cpu", max_model_len=256, kv_cache_memory=8 << 20,
               speculative_config=spec, **kw)


def _tokens(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


GREEDY = [SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=7, temperature=0),
          SamplingParams(max_tokens=24, temperature=0, logprobs=1),
          SamplingParams(max_tokens=16, temperature=0)]


def record_proposals(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """From now on, each (context up to the draft start, drafts) the EAGLE proposer fills in."""
    eagle = llm.llm_engine.core.runner.eagle
    seen: list[tuple[list[int], list[int]]] = []
    propose = eagle.propose

    def recording(so) -> None:  # noqa: ANN001 - a SchedulerOutput
        propose(so)
        seen.extend((s.request.all_token_ids[: s.start + 1], list(s.spec_token_ids))
                    for s in so.scheduled if s.spec_token_ids)

    eagle.propose = recording
    return seen


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_outputs_equal_the_target_alone(target: Path, tmp_path: Path, k: int) -> None:
    """Batched greedy requests keep the target's own tokens, whatever the head proposes: a
    1-layer head with an fc bias from safetensors, and a 2-layer head without from .bin."""
    plain = _tokens(_llm(target, None), GREEDY)
    for head in (make_eagle_head(tmp_path / "a", target, seed=1),
                 make_eagle_head(tmp_path / "b", target, seed=2, num_layers=2, fmt="bin",
                                 fc_bias=False)):
        llm = _llm(target, head, k)
        assert _tokens(llm, GREEDY) == plain, head
        st = llm.llm_engine.core.get_stats()
        assert st.spec_num_draft_tokens > 0 and st.spec_num_accepted_tokens <= st.spec_num_draft_tokens
    # sampled requests verify against the head's drafts too: seeded, they repeat
    sampled = [SamplingParams(max_tokens=12, temperature=0.8, seed=i) for i in range(len(PROMPTS))]
    assert _tokens(llm, sampled) == _tokens(llm, sampled)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    freqs = pos[:, None].double() / theta ** (torch.arange(0, d, 2).double() / d)
    cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None].float(), torch.cat((freqs, freqs), -1).sin()[:, None].float()
    rot = torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)
    return x * cos + rot * sin


def reference_head(w: dict[str, torch.Tensor], cfg: dict, embed: torch.Tensor, ids: list[int],
                   hidden: torch.Tensor) -> torch.Tensor:
    """The EAGLE-1 head over rows 0..n-1 (row p at position p) in plain torch: fc(concat(
    embedding, hidden)), Llama layers (the first without input norm), no final norm."""
    n, h = hidden.shape
    nh, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps = h // nh, cfg["rms_norm_eps"]
    pos = torch.arange(n)
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]  # transformers 4 / 5
    x = torch.cat((embed[ids], hidden), -1) @ w["fc.weight"].T
    if "fc.bias" in w:
        x = x + w["fc.bias"]
    mask = torch.ones(n, n).tril().bool()
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        a = x if i == 0 else _rms(x, w[p + "input_layernorm.weight"], eps)
        q = _rope((a @ w[p + "self_attn.q_proj.weight"].T).view(n, nh, d), pos, theta)
        k = _rope((a @ w[p + "self_attn.k_proj.weight"].T).view(n, kvh, d), pos, theta)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(n, kvh, d)
        k, v = k.repeat_interleave(nh // kvh, 1), v.repeat_interleave(nh // kvh, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(n, h) @ w[p + "self_attn.o_proj.weight"].T
        m = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return x


def test_drafts_equal_a_reference_eagle_forward(target: Path, tmp_path: Path) -> None:
    """Every draft the engine proposes (recorded as the runner fills them in) is the argmax of
    a plain-torch EAGLE forward: rows p = 0 .. L-1 read token p + 1 and the target's final
    (normed) hidden state at p, then each draft row reads the previous draft and the head's
    own output; logits from the target's LM head."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    head = make_eagle_head(tmp_path / "head", target, seed=4, num_layers=2)
    # prompts in chunks of 16 tokens: the head catches up over each chunk the step after
    llm = _llm(target, head, 3, enable_prefix_caching=False, max_num_batched_tokens=16)
    seen = record_proposals(llm)
    _tokens(llm, GREEDY)
    assert len(seen) >= 10 and any(len(d) == 3 for _, d in seen)
    ref = LlamaForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    w, cfg = load_file(str(head / "model.safetensors")), json.loads((head / "config.json").read_text())
    embed, lm_head = ref.model.embed_tokens.weight, ref.lm_head.weight
    checked = 0
    with torch.no_grad():
        for context, drafts in seen:
            feats = ref.model(torch.tensor([context])).last_hidden_state[0]
            ids, hid = context[1:], feats[:-1]  # row p: token p + 1, the target's state at p
            for draft in drafts:
                out = reference_head(w, cfg, embed, ids, hid)
                logits = out[-1] @ lm_head.T
                assert logits[draft] >= logits.max() - 1e-4, (context, drafts)
                ids, hid = ids + [draft], torch.cat((hid, out[-1:]))
                checked += 1
    assert checked >= 20


def _bigram_target(path: Path) -> Path:
    """A 1-layer Llama whose attention adds nothing (o_proj 0), with unit-RMS embedding rows and
    unit norm weights: its next token is a function of the current one."""
    from transformers import LlamaForCausalLM

    make_tiny_llama_dir(path, seed=7, num_layers=1)
    m = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        e = m.model.embed_tokens.weight.normal_()  # (HF zeroes the pad token's row)
        e /= e.pow(2).mean(-1, keepdim=True).sqrt()
        layer = m.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.input_layernorm.weight.fill_(1.0)
        m.model.norm.weight.fill_(1.0)
    m.save_pretrained(path, safe_serialization=True)
    return path


def test_a_head_that_copies_the_target_gets_its_drafts_accepted(tmp_path: Path) -> None:
    """A head built to predict what the target will: fc passes the embedding of the token at
    p + 1 through, and its layer is the target's (no attention, no input norm on unit-RMS rows,
    the final norm a positive scale), so lm_head(head output) ranks tokens as the target does
    at p + 1. Its drafts are the target's greedy continuation: nearly all accepted."""
    from safetensors.torch import load_file

    tgt = _bigram_target(tmp_path / "bigram")
    t = load_file(str(tgt / "model.safetensors"))
    h = t["model.embed_tokens.weight"].shape[1]
    weights = {"fc.weight": torch.cat((torch.eye(h), torch.zeros(h, h)), 1)}
    for name, tensor in t.items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            weights[name.removeprefix("model.")] = tensor
    head = make_eagle_head(tmp_path / "head", tgt, seed=0, fmt="bin", weights=weights)
    params = [SamplingParams(max_tokens=30, temperature=0)] * len(PROMPTS)
    plain = _tokens(_llm(tgt, None), params)
    llm = _llm(tgt, head, 3)
    assert _tokens(llm, params) == plain
    st = llm.llm_engine.core.get_stats()
    assert st.spec_num_draft_tokens >= 40
    assert st.spec_num_accepted_tokens >= 0.9 * st.spec_num_draft_tokens
    # a random head on the same target: few of its drafts survive
    other = _llm(tgt, make_eagle_head(tmp_path / "random", tgt, seed=5), 3)
    assert _tokens(other, params) == plain
    rnd = other.llm_engine.core.get_stats()
    assert rnd.spec_num_accepted_tokens < 0.5 * rnd.spec_num_draft_tokens


def _gemma(path: Path) -> Path:
    """A tiny Gemma: its embedding is scaled by sqrt(hidden_size), unlike the heads' targets."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=259, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      max_position_embeddings=512)
    GemmaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_eagle_errors(target: Path, tmp_path: Path) -> None:
    good = make_eagle_head(tmp_path / "good", target, seed=1)
    spec = {"method": "eagle", "model": str(good), "num_speculative_tokens": 2}
    narrow = make_eagle_head(tmp_path / "narrow", target, seed=1, hidden_size=32)
    for kw, match in [
        (dict(model=str(_gemma(tmp_path / "gemma"))), "needs a Llama-family target"),
        (dict(model=str(target), speculative_config={**spec, "model": str(narrow)}),
         r"hidden_size \(32\) differs from the target's \(64\)"),
        (dict(model=str(target), tensor_parallel_size=2), "EAGLE head needs tensor_parallel_size 1"),
        (dict(model=str(target), speculative_config={**spec, "model": str(tmp_path / "none")}),
         "speculative_config.model"),
    ]:
        kw.setdefault("speculative_config", spec)
        with pytest.raises(ValueError, match=match):
            EngineArgs(**kw, max_model_len=64).create_engine_config()
    # tensors that do not fit the layout are named when the head loads
    full = make_eagle_head(tmp_path / "full", target, seed=1)
    from safetensors.torch import load_file

    w = load_file(str(full / "model.safetensors"))
    no_fc = {k: v for k, v in w.items() if k != "fc.weight"}
    extra = {**w, "norm.weight": torch.ones(64)}
    for name, weights, match in [("no_fc", no_fc, "missing weights for fc.weight"),
                                 ("extra", extra, "'norm.weight' matches no parameter")]:
        bad = make_eagle_head(tmp_path / name, target, seed=1, weights=weights)
        with pytest.raises(ValueError, match=match):
            _llm(target, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eagle_on_cuda(target: Path, tmp_path: Path, dtype: str) -> None:
    """On CUDA the head runs eagerly beside the target (whose plain decode steps may replay a
    CUDA graph: the kept hidden states are copies of its output buffer). float32: every token
    equals plain decoding's; bfloat16 (Triton kernels, graphs): the first 8, as the n-gram and
    draft-model CUDA test asks."""
    kw = dict(model=str(target), device="cuda", dtype=dtype, max_model_len=256,
              kv_cache_memory=64 << 20)  # a fixed share: not what earlier engines left free
    p = SamplingParams(max_tokens=30, temperature=0)
    plain = [o.outputs[0].token_ids for o in LLM(**kw).generate(PROMPTS, p, use_tqdm=False)]
    head = make_eagle_head(tmp_path / "head", target, seed=1)
    llm = LLM(**kw, speculative_config={"method": "eagle", "model": str(head),
                                        "num_speculative_tokens": 3})
    spec = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p, use_tqdm=False)]
    if dtype == "float32":
        assert spec == plain
    else:
        assert [t[:8] for t in spec] == [t[:8] for t in plain]
    assert llm.llm_engine.core.get_stats().spec_num_draft_tokens > 0
