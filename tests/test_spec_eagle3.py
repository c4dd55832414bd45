"""EAGLE-3 speculative decoding: a head fed three of the target's layer streams proposes drafts
over its own smaller vocabulary (d2t maps them to target ids).

Heads are built here in the published layout (fc, midlayer.* or layers.N.*, norm, lm_head,
d2t, t2d) with random weights; a plain-torch EAGLE-3 forward over HF transformers'
``hidden_states`` of the target checks what the engine proposes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import TINY_VOCAB, make_tiny_llama_dir, make_tiny_qwen2_dir
from modelport import LLM, SamplingParams
from modelport.engine.arg_utils import EngineArgs
from test_spec_eagle import (
    GREEDY,
    PROMPTS,
    _gemma,
    _rms,
    _rope,
    _tokens,
    make_eagle_head,
    record_proposals,
    write_head,
)
from test_spec_eagle import _llm as eagle_llm


def draft_ids(seed: int, size: int) -> torch.Tensor:
    """A sorted random subset of the target's ids: the draft vocabulary, as target ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(TINY_VOCAB, generator=g)[:size].sort().values


def make_eagle3_head(path: Path, target: Path, *, seed: int, num_layers: int = 1,
                     draft: torch.Tensor | None = None, aux: list[int] | None = None,
                     midlayer: bool = True, own_embed: bool = False, fmt: str = "safetensors",
                     hidden_size: int | None = None, with_d2t: bool = True,
                     norm_before_residual: bool = False,
                     weights: dict[str, torch.Tensor] | None = None) -> Path:
    """An EAGLE-3 head folder for ``target``: config.json (draft_vocab_size, optional
    eagle_aux_hidden_state_layer_ids) and random tensors (``weights`` replaces them). ``draft``:
    the draft vocabulary's target ids (default: all of them)."""
    cfg = json.loads((target / "config.json").read_text())
    h = hidden_size or cfg["hidden_size"]
    draft = torch.arange(cfg["vocab_size"]) if draft is None else draft
    cfg.update(architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=num_layers,
               hidden_size=h, draft_vocab_size=len(draft), target_hidden_size=h,
               norm_before_residual=norm_before_residual)
    if aux is not None:
        cfg["eagle_aux_hidden_state_layer_ids"] = aux
    nh, kvh, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    d = h // nh
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    if weights is None:
        weights = {"fc.weight": rnd(h, 3 * h, std=0.1), "norm.weight": 1 + rnd(h, std=0.1),
                   "lm_head.weight": rnd(len(draft), h, std=0.1)}
        for i in range(num_layers):
            p = ("midlayer." if midlayer else "layers.0.") if i == 0 else f"layers.{i}."
            width = 2 * h if i == 0 else h
            weights.update({
                p + "self_attn.q_proj.weight": rnd(nh * d, width),
                p + "self_attn.k_proj.weight": rnd(kvh * d, width),
                p + "self_attn.v_proj.weight": rnd(kvh * d, width),
                p + "self_attn.o_proj.weight": rnd(h, nh * d),
                p + "mlp.gate_proj.weight": rnd(inter, h),
                p + "mlp.up_proj.weight": rnd(inter, h),
                p + "mlp.down_proj.weight": rnd(h, inter),
                p + "input_layernorm.weight": 1 + rnd(h, std=0.1),
                p + "post_attention_layernorm.weight": 1 + rnd(h, std=0.1),
            })
            if i == 0:
                weights[p + "hidden_norm.weight"] = 1 + rnd(h, std=0.1)
        if own_embed:
            weights["embed_tokens.weight"] = rnd(cfg["vocab_size"], h, std=0.5)
    if with_d2t:
        weights["d2t"] = draft - torch.arange(len(draft))
        t2d = torch.zeros(cfg["vocab_size"], dtype=torch.bool)
        t2d[draft] = True
        weights["t2d"] = t2d
    return write_head(path, cfg, weights, fmt)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 layers: vLLM's default aux layers (2, L // 2, L - 3) are 2, 4, 5
    return make_tiny_llama_dir(tmp_path_factory.mktemp("eagle3") / "target", seed=3,
                               num_layers=8)


def _llm(model: Path, head: Path | None, k: int = 3, **kw) -> LLM:
    return eagle_llm(model, head, k, method="eagle3", **kw)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_outputs_equal_the_target_alone(target: Path, tmp_path: Path, k: int) -> None:
    """Batched greedy requests keep the target's tokens: a 1-layer head (midlayer.*, default aux
    layers, a 200-token draft vocabulary) from safetensors, and a 2-layer head (layers.0.*, its
    own embedding, aux layers given out of order, norm_before_residual) from .bin."""
    plain = _tokens(_llm(target, None), GREEDY)
    heads = (make_eagle3_head(tmp_path / "a", target, seed=1, draft=draft_ids(0, 200)),
             make_eagle3_head(tmp_path / "b", target, seed=2, num_layers=2, midlayer=False,
                              own_embed=True, aux=[6, 1, 3], fmt="bin",
                              norm_before_residual=True))
    for head in heads:
        llm = _llm(target, head, k)
        assert llm.llm_engine.core.runner.model.model.aux_layers in ((2, 4, 5), (1, 3, 6))
        assert _tokens(llm, GREEDY) == plain, head
        st = llm.llm_engine.core.get_stats()
        assert st.spec_num_draft_tokens > 0 and st.spec_num_accepted_tokens <= st.spec_num_draft_tokens
    sampled = [SamplingParams(max_tokens=12, temperature=0.8, seed=i) for i in range(len(PROMPTS))]
    assert _tokens(llm, sampled) == _tokens(llm, sampled)


def _attention(a: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: dict) -> torch.Tensor:
    n = a.shape[0]
    h, nh, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, pos = h // nh, torch.arange(n)
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]  # transformers 4 / 5
    q = _rope((a @ w[p + "self_attn.q_proj.weight"].T).view(n, nh, d), pos, theta)
    k = _rope((a @ w[p + "self_attn.k_proj.weight"].T).view(n, kvh, d), pos, theta)
    v = (a @ w[p + "self_attn.v_proj.weight"].T).view(n, kvh, d)
    k, v = k.repeat_interleave(nh // kvh, 1), v.repeat_interleave(nh // kvh, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5
    att = scores.masked_fill(~torch.ones(n, n).tril().bool(), float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", att, v).reshape(n, h) @ w[p + "self_attn.o_proj.weight"].T


def _mlp(x: torch.Tensor, w: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T


def reference_head(w: dict[str, torch.Tensor], cfg: dict, embed: torch.Tensor, ids: list[int],
                   hidden: torch.Tensor) -> torch.Tensor:
    """The EAGLE-3 head over rows 0..n-1 in plain torch, from the checkpoint's names: layer 0
    attends over concat(input_layernorm(embed), hidden_norm(hidden)) with hidden as its
    residual, later layers are Llama layers. Returns the pre-norm output."""
    eps = cfg["rms_norm_eps"]
    normed = _rms(hidden, w["midlayer.hidden_norm.weight"], eps)
    x = normed if cfg["norm_before_residual"] else hidden
    a = torch.cat((_rms(embed[ids], w["midlayer.input_layernorm.weight"], eps), normed), -1)
    x = x + _attention(a, w, "midlayer.", cfg)
    x = x + _mlp(_rms(x, w["midlayer.post_attention_layernorm.weight"], eps), w, "midlayer.")
    for i in range(1, cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        x = x + _attention(_rms(x, w[p + "input_layernorm.weight"], eps), w, p, cfg)
        x = x + _mlp(_rms(x, w[p + "post_attention_layernorm.weight"], eps), w, p)
    return x


def test_drafts_equal_a_reference_eagle3_forward(target: Path, tmp_path: Path) -> None:
    """Every draft the engine proposes is the target id of the argmax of a plain-torch EAGLE-3
    forward: rows p = 0 .. L-1 read token p + 1 and fc(concat of HF's hidden_states[2, 4, 5]
    at p), each draft row reads the previous draft and the head's own pre-norm output (no fc);
    logits from norm and the head's lm_head over its 150-token vocabulary, mapped by d2t."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    draft = draft_ids(1, 150)
    head = make_eagle3_head(tmp_path / "head", target, seed=4, num_layers=2, draft=draft)
    llm = _llm(target, head, 3, enable_prefix_caching=False, max_num_batched_tokens=16)
    seen = record_proposals(llm)
    _tokens(llm, GREEDY)
    assert len(seen) >= 10 and any(len(d) == 3 for _, d in seen)
    ref = LlamaForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    w, cfg = load_file(str(head / "model.safetensors")), json.loads((head / "config.json").read_text())
    embed = ref.model.embed_tokens.weight
    checked = 0
    with torch.no_grad():
        for context, drafts in seen:
            states = ref.model(torch.tensor([context]), output_hidden_states=True).hidden_states
            aux = torch.cat([states[j][0] for j in (2, 4, 5)], -1) @ w["fc.weight"].T
            ids, hid = context[1:], aux[:-1]  # row p: token p + 1, the target's streams at p
            for want in drafts:
                out = reference_head(w, cfg, embed, ids, hid)
                logits = _rms(out[-1], w["norm.weight"], cfg["rms_norm_eps"]) @ w["lm_head.weight"].T
                got = int((draft == want).nonzero()[0, 0])  # want is a target id of the draft vocab
                assert logits[got] >= logits.max() - 1e-4, (context, drafts)
                ids, hid = ids + [want], torch.cat((hid, out[-1:]))
                checked += 1
    assert checked >= 20


def _copy_target(path: Path) -> tuple[Path, list[int]]:
    """A 3-layer Llama whose attentions add nothing (o_proj 0) and whose layers 1 and 2 add
    nothing at all (down_proj 0), with unit-RMS embedding rows and unit norm weights: its next
    token is a function f of the current one. Returns it and f."""
    from transformers import LlamaForCausalLM

    make_tiny_llama_dir(path, seed=7, num_layers=3)
    m = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        e = m.model.embed_tokens.weight.normal_()
        e /= e.pow(2).mean(-1, keepdim=True).sqrt()
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            if i:
                layer.mlp.down_proj.weight.zero_()
        m.model.norm.weight.fill_(1.0)
        f = m(torch.arange(TINY_VOCAB)[:, None]).logits[:, 0].argmax(-1).tolist()
    m.save_pretrained(path, safe_serialization=True)
    return path, f


def test_a_constructed_head_gets_its_drafts_accepted(tmp_path: Path) -> None:
    """A head that reads the embedding of the token at p (aux layer 0) through fc and adds
    nothing (o_proj and down_proj 0), with lm_head rows built so that the embedding of t scores
    f(f(t)) highest: its first draft is the target's next-but-one token, in its draft
    vocabulary (the f(f(t)) and a few more). With k = 1 nearly every draft is accepted."""
    tgt, f = _copy_target(tmp_path / "target")
    from safetensors.torch import load_file

    emb = load_file(str(tgt / "model.safetensors"))["model.embed_tokens.weight"]
    h = emb.shape[1]
    ff = [f[f[t]] for t in range(TINY_VOCAB)]
    draft = torch.tensor(sorted(set(ff) | {0, 1, 2}))
    lm_head = torch.stack([emb[[t for t in range(TINY_VOCAB) if ff[t] == d]].sum(0)
                           if d in ff else torch.zeros(h) for d in draft.tolist()])
    weights = make_eagle3_weights_passing(h, tgt, lm_head)
    head = make_eagle3_head(tmp_path / "head", tgt, seed=0, draft=draft, aux=[0, 1, 2],
                            weights=weights)
    params = [SamplingParams(max_tokens=30, temperature=0)] * len(PROMPTS)
    plain = _tokens(_llm(tgt, None), params)
    for k, share in ((1, 0.8), (3, 0.25)):
        llm = _llm(tgt, head, k)
        assert _tokens(llm, params) == plain
        st = llm.llm_engine.core.get_stats()
        assert st.spec_num_draft_tokens >= 30
        assert st.spec_num_accepted_tokens >= share * st.spec_num_draft_tokens, (k, st)


def make_eagle3_weights_passing(h: int, target: Path, lm_head: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 1-layer head whose output is fc's: attention and MLP add nothing, fc passes the first
    aux stream (the embedding) through, the final norm is a unit scale."""
    cfg = json.loads((target / "config.json").read_text())
    nh, kvh, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    d = h // nh
    w = {"fc.weight": torch.cat((torch.eye(h), torch.zeros(h, 2 * h)), 1),
         "norm.weight": torch.ones(h), "lm_head.weight": lm_head}
    for name, shape in [("self_attn.q_proj", (nh * d, 2 * h)), ("self_attn.k_proj", (kvh * d, 2 * h)),
                        ("self_attn.v_proj", (kvh * d, 2 * h)), ("self_attn.o_proj", (h, nh * d)),
                        ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                        ("mlp.down_proj", (h, inter))]:
        w[f"midlayer.{name}.weight"] = torch.zeros(shape) if name.endswith(("o_proj", "down_proj")) \
            else torch.randn(shape) * 0.1
    for name in ("input_layernorm", "post_attention_layernorm", "hidden_norm"):
        w[f"midlayer.{name}.weight"] = torch.ones(h)
    return w


def _tiny_qwen3(path: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(5)
    cfg = Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, bos_token_id=256, eos_token_id=257)
    Qwen3ForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


def test_qwen_targets(tmp_path: Path) -> None:
    """Qwen3 (q/k norms, tied embeddings) with an EAGLE-3 head and Qwen2 (q/k/v bias) with an
    EAGLE-1 head: the heads are the same Llama-style layers; greedy outputs are the target's."""
    from helpers.tiny_models import _byte_level_tokenizer

    qwen3 = _tiny_qwen3(tmp_path / "qwen3")
    _byte_level_tokenizer().save_pretrained(qwen3)
    qwen2 = make_tiny_qwen2_dir(tmp_path / "qwen2")
    params = [SamplingParams(max_tokens=16, temperature=0)] * len(PROMPTS)
    for tgt, method, head in [
        (qwen3, "eagle3", make_eagle3_head(tmp_path / "h3", qwen3, seed=1, aux=[0, 1, 3],
                                           draft=draft_ids(2, 100))),
        (qwen2, "eagle", make_eagle_head(tmp_path / "h1", qwen2, seed=1)),
    ]:
        plain = _tokens(_llm(tgt, None), params)
        llm = LLM(model=str(tgt), device="cpu", max_model_len=256, kv_cache_memory=8 << 20,
                  speculative_config={"method": method, "model": str(head),
                                      "num_speculative_tokens": 2})
        assert _tokens(llm, params) == plain, method
        assert llm.llm_engine.core.get_stats().spec_num_draft_tokens > 0


def test_eagle3_errors(target: Path, tmp_path: Path) -> None:
    good = make_eagle3_head(tmp_path / "good", target, seed=1)
    spec = {"method": "eagle3", "model": str(good), "num_speculative_tokens": 2}
    small = make_tiny_llama_dir(tmp_path / "small", seed=1)  # 2 layers: no default aux layers
    for kw, match in [
        (dict(model=str(_gemma(tmp_path / "gemma"))), "needs a Llama-family target"),
        (dict(speculative_config={**spec, "model": str(make_eagle3_head(
            tmp_path / "narrow", target, seed=1, hidden_size=32))}),
         r"hidden_size \(32\) differs from the target's \(64\)"),
        (dict(speculative_config={**spec, "model": str(make_eagle3_head(
            tmp_path / "ids", target, seed=1, aux=[0, 3, 8]))}),
         r"eagle_aux_hidden_state_layer_ids \[0, 3, 8\] must be three distinct layer indices "
         r"in \[0, 8\)"),
        (dict(speculative_config={**spec, "model": str(make_eagle3_head(
            tmp_path / "dup", target, seed=1, aux=[2, 2, 5]))}), "three distinct"),
        (dict(model=str(small)), r"the default aux layers \[2, 1, -1\]"),
        (dict(tensor_parallel_size=2), "EAGLE head needs tensor_parallel_size 1"),
    ]:
        kw.setdefault("model", str(target))
        kw.setdefault("speculative_config", spec)
        with pytest.raises(ValueError, match=match):
            EngineArgs(**kw, max_model_len=64).create_engine_config()
    # found when the head loads: a smaller draft vocabulary without d2t, a missing tensor
    no_d2t = make_eagle3_head(tmp_path / "no_d2t", target, seed=1, draft=draft_ids(0, 100),
                              with_d2t=False)
    with pytest.raises(ValueError, match=r"draft vocabulary \(100 tokens\) is smaller than the "
                                         r"target's \(259\) but the checkpoint has no d2t"):
        _llm(target, no_d2t)
    from safetensors.torch import load_file

    w = load_file(str(good / "model.safetensors"))
    for name, weights, match in [
        ("no_norm", {k: v for k, v in w.items() if k != "midlayer.hidden_norm.weight"},
         "missing weights for layers.0.hidden_norm.weight"),
        ("bad_d2t", {**w, "d2t": w["d2t"][:-1]}, "d2t must be 259 integer offsets"),
    ]:
        bad = make_eagle3_head(tmp_path / name, target, seed=1, weights=weights, with_d2t=False)
        with pytest.raises(ValueError, match=match):
            _llm(target, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eagle3_on_cuda(target: Path, tmp_path: Path, dtype: str) -> None:
    """On CUDA the target runs without CUDA graphs (they do not keep the aux streams) and the
    head eagerly. float32: every token equals plain decoding's; bfloat16: the first 8, as the
    EAGLE-1 CUDA test asks."""
    kw = dict(model=str(target), device="cuda", dtype=dtype, max_model_len=256,
              kv_cache_memory=64 << 20)  # a fixed share: not what earlier engines left free
    p = SamplingParams(max_tokens=30, temperature=0)
    plain = [o.outputs[0].token_ids for o in LLM(**kw).generate(PROMPTS, p, use_tqdm=False)]
    head = make_eagle3_head(tmp_path / "head", target, seed=1, draft=draft_ids(0, 200))
    llm = LLM(**kw, speculative_config={"method": "eagle3", "model": str(head),
                                        "num_speculative_tokens": 3})
    assert llm.llm_engine.core.runner.graphs is None
    spec = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p, use_tqdm=False)]
    if dtype == "float32":
        assert spec == plain
    else:
        assert [t[:8] for t in spec] == [t[:8] for t in plain]
    assert llm.llm_engine.core.get_stats().spec_num_draft_tokens > 0
