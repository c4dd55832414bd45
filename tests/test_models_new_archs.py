"""SmolLM3 (NoPE layers), StarCoder2 (LayerNorm, biases, GeLU MLP) and Gemma 3 multimodal
checkpoints served text-only (Gemma3ForConditionalGeneration) against HF transformers on
tiny random models: fp32 logits of a few-dozen-token prompt, greedy tokens through ``LLM``
(chunked prefill, batched and one at a time), the planner on the folder, and bf16 greedy on
CUDA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.tiny_models import _byte_level_tokenizer, run_one_sequence
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.layers.attention import Attention, reference_paged_attention
from modelport.loader import load_model, load_model_config, resolve_model

WINDOW = 6
BASE = dict(vocab_size=384, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, bos_token_id=256,
            eos_token_id=257, pad_token_id=258, initializer_range=0.08)
PROMPT = [256] + [(7 * i + 3) % 250 for i in range(39)]  # 40 tokens
PROMPTS = [PROMPT, [256, 10, 20, 30, 40], PROMPT[:17] + [201, 202, 203]]
N_NEW = 10


def _configs() -> dict[str, Any]:
    import transformers as tf

    return {
        # layer 0 is a NoPE layer (the shared rotary is found past it), layer 3 too
        "smollm3": tf.SmolLM3Config(**BASE, num_hidden_layers=4, no_rope_layers=[0, 1, 1, 0],
                                    rms_norm_eps=1e-5),
        # HF's default rule (every 2nd layer NoPE here) and a window on the NoPE layers
        "smollm3_sliding": tf.SmolLM3Config(**BASE, num_hidden_layers=4,
                                            no_rope_layer_interval=2, use_sliding_window=True,
                                            sliding_window=WINDOW, rms_norm_eps=1e-5),
        # StarCoder2-3B style: biases everywhere, tied head, GeLU(tanh) MLP
        "starcoder2": tf.Starcoder2Config(**BASE, num_hidden_layers=3, norm_epsilon=1e-5,
                                          use_bias=True, tie_word_embeddings=True),
        # a window on every layer, no biases, an untied head
        "starcoder2_sliding": tf.Starcoder2Config(**BASE, num_hidden_layers=2,
                                                  sliding_window=WINDOW, use_bias=False,
                                                  tie_word_embeddings=False),
        # Gemma 3 4B-27B's checkpoint layout: the text decoder nested in text_config, beside a
        # (tiny) SigLIP vision tower and projector that are never read
        "gemma3_mm": tf.Gemma3Config(
            text_config=dict(
                BASE, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
                sliding_window_pattern=2, query_pre_attn_scalar=12, rms_norm_eps=1e-6,
                # null as in the released configs (HF's multimodal class never applies it;
                # vLLM's, and ours, apply it as the text model does)
                final_logit_softcapping=None,
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=300, boi_token_index=301,
            eoi_token_index=302),
    }


# per kind: each layer's (applies rope, sliding window) as HF runs it
LAYERS = {
    "smollm3": [(False, None), (True, None), (True, None), (False, None)],
    "smollm3_sliding": [(True, None), (False, WINDOW), (True, None), (False, WINDOW)],
    "starcoder2": [(True, None)] * 3,
    "starcoder2_sliding": [(True, WINDOW)] * 2,
    "gemma3_mm": [(True, WINDOW), (True, None), (True, WINDOW), (True, None)],
}


def _hf_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _save(kind: str, cfg: Any, path: Path) -> Path:
    torch.manual_seed(0)
    model = _hf_class(kind).from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init: a missed one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    _byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("new_archs")
    return {k: _save(k, cfg, root / k) for k, cfg in _configs().items()}


def _hf(kind: str, d: Path, dtype: torch.dtype = torch.float32) -> Any:
    return _hf_class(kind).from_pretrained(d, dtype=dtype, attn_implementation="eager").eval()


def _ours(d: Path) -> torch.nn.Module:
    src = resolve_model(str(d))
    return load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                      torch.device("cpu"))


def _hf_greedy(model: Any, prompt: list[int], n: int, device: str = "cpu") -> list[int]:
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=258)
    return out[0, len(prompt):].tolist()


KINDS = list(LAYERS)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(dirs: dict[str, Path], kind: str) -> None:
    model = _ours(dirs[kind])
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert [a.sliding_window for a in attns] == [w for _, w in LAYERS[kind]]
    if kind.startswith("smollm3"):
        layers = model.model.layers
        assert [lay.self_attn.rotary_emb is not None for lay in layers] == [
            r for r, _ in LAYERS[kind]]
    with torch.no_grad():
        ref = _hf(kind, dirs[kind])(torch.tensor([PROMPT])).logits[0].float()
    ours = run_one_sequence(model, PROMPT, block_size=4)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_llm_greedy_matches_hf_generate(dirs: dict[str, Path], kind: str) -> None:
    """10 greedy tokens through LLM (16-token prefill chunks over 8-token blocks) equal HF
    generate's; batched equals one at a time (then from prefix-cached blocks)."""
    d = dirs[kind]
    hf = _hf(kind, d)
    want = [_hf_greedy(hf, p, N_NEW) for p in PROMPTS]
    llm = LLM(str(d), kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=16, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    batched = llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in batched] == want
    for p, w in zip(PROMPTS, want):
        out = llm.generate(prompt_token_ids=[p], sampling_params=sp, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == w


def test_smollm3_nope_layers_never_reach_a_rotary_in_attention(dirs: dict[str, Path]) -> None:
    """A NoPE layer never calls forward_rope: the backend's rotary-in-attention test (the
    Triton decode kernel's ``rope_fits``, consulted on CUDA decode steps and in CUDA graphs)
    is asked by the rope layers only, so no backend can rotate a NoPE layer's q / k."""
    model = _ours(dirs["smollm3"])
    asked: list[int] = []
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for a in attns:
        a.backend = reference_paged_attention  # pinned: _select_backend keeps the spy below

        def spy(q, kv, meta, rotary, idx=a.layer_idx):  # noqa: ANN001, ANN202
            assert rotary is not None
            asked.append(idx)
            return False

        a._rope_fits = spy
    run_one_sequence(model, PROMPT[:12], block_size=4)
    assert sorted(set(asked)) == [1, 2]


@pytest.mark.parametrize("change, match", [
    ({"no_rope_layers": [1, 0]}, "no_rope_layers must list a 0 or 1 per layer"),
    ({"no_rope_layers": [1, 2, 1, 0]}, "no_rope_layers must list"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_smollm3_bad_configs_are_refused(dirs: dict[str, Path], tmp_path: Path,
                                         change: dict[str, Any], match: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in dirs["smollm3"].iterdir():
        (d / f.name).symlink_to(f)
    cfg = json.loads((dirs["smollm3"] / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=match):
        _ours(d)


@pytest.mark.parametrize("kind", KINDS)
def test_planner_reads_the_folder(dirs: dict[str, Path], kind: str,
                                  capsys: pytest.CaptureFixture) -> None:
    """`modelport plan` on the folder: the weights it counts are the parameters the engine
    loads, and its KV bytes per token follow the (text) config."""
    from modelport.entrypoints.cli import main

    capsys.readouterr()
    rc = main(["plan", "--model", str(dirs[kind]), "--gpu", "cpu", "--memory", "8",
               "--kv-cache-memory", str(4 << 20), "--json"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    model = _ours(dirs[kind])
    params = sum(p.numel() for p in model.parameters())
    assert params == model.config.num_params
    # the planner's tensor list is Llama's: Gemma 3's per-head q/k norms and its norms
    # around the MLP are left out (4 vectors a layer: < 0.01 % of a real model)
    cfg = model.config
    omitted = (2 * cfg.num_hidden_layers * (cfg.head_dim + cfg.hidden_size)
               if kind.startswith("gemma3") else 0)
    assert plan["model"]["num_params"] == params - omitted
    assert plan["weights"]["resident_per_gpu_bytes"] == 4 * (params - omitted)  # fp32, CPU
    # the bytes measured from the file: the loaded tensors only (no vision tower)
    from modelport.planner.model_source import resolve_model as planner_resolve

    assert planner_resolve(str(dirs[kind])).weight_bytes == 4 * params
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert plan["kv_cache"]["bytes_per_token"] == per_token
    block = plan["kv_cache"]["block_size"]
    assert plan["kv_cache"]["tokens"] == (4 << 20) // (per_token * block) * block


def _hf_greedy_cuda_bf16(kind: str, d: Path, prompt: list[int], n: int
                         ) -> tuple[list[int], list[float]]:
    """HF's bf16 greedy tokens and, for each, the gap between its top two logits."""
    model = _hf_class(kind).from_pretrained(d, dtype=torch.bfloat16,
                                            attn_implementation="eager").cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=258, output_scores=True,
                             return_dict_in_generate=True)
    gaps = [float(t.topk(2).values[0, 0] - t.topk(2).values[0, 1]) for t in out.scores]
    return out.sequences[0, len(prompt):].tolist(), gaps


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_bf16_greedy_matches_hf(dirs: dict[str, Path], kind: str) -> None:
    """On CUDA (Triton attention with its decode-step rotary, fused small ops, CUDA graphs)
    in bf16: greedy tokens equal HF's bf16 generate up to its first near-tie, batched equals
    one at a time."""
    d = dirs[kind]
    llm = LLM(str(d), device="cuda", dtype="bfloat16", kv_cache_memory=1 << 30,
              max_num_batched_tokens=128, block_size=16, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in
               llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp, use_tqdm=False)]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=sp,
                          use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert batched == alone
    compared = 0
    for p, got in zip(PROMPTS, alone):
        want, gaps = _hf_greedy_cuda_bf16(kind, d, p, 8)
        # up to HF's first near-tie: two bf16 implementations may break a tie of a random
        # tiny model's flat logits either way (a real error differs from the start)
        n = next((i for i, gap in enumerate(gaps) if gap < 0.02), len(want))
        assert list(got[:n]) == want[:n], (kind, p[:4], gaps)
        compared += n
    assert compared >= 2, (kind, "too few tokens before a near-tie to compare")


def test_starcoder2_tp2_greedy_equals_tp1(dirs: dict[str, Path]) -> None:
    """Tensor parallelism splits c_fc by rows (its bias too) and c_proj by columns (its
    bias added once): the same greedy tokens as one rank."""
    d = dirs["starcoder2"]
    kw = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=64, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    want = LLM(str(d), **kw).generate(prompt_token_ids=PROMPTS, sampling_params=sp,
                                      use_tqdm=False)
    llm = LLM(str(d), tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    finally:
        llm.llm_engine.core.shutdown()


# ---------------------------------------------------------------------------------------
# Gemma 3 multimodal checkpoints, text-only
# ---------------------------------------------------------------------------------------
def test_gemma3_mm_loads_the_transformers_4_52_layout(dirs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """Checkpoints saved by transformers 4.52+ name the decoder ``model.language_model.*``
    (the vision tower ``model.vision_tower.*``) and may store ``lm_head.weight``: the same
    logits."""
    from safetensors.torch import load_file, save_file

    src = dirs["gemma3_mm"]
    d = tmp_path / "g3"
    d.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    renamed = {}
    for name, t in load_file(src / "model.safetensors").items():
        for old, new in (("language_model.model.", "model.language_model."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = t
    renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    assert any(n.startswith("model.vision_tower.") for n in renamed)
    save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours = run_one_sequence(_ours(d), PROMPT, block_size=4)
    torch.testing.assert_close(ours, run_one_sequence(_ours(src), PROMPT, block_size=4),
                               atol=0, rtol=0)


def _gemma3_4b_it_config() -> dict[str, Any]:
    """gemma-3-4b-it's config.json as released: a few keys in text_config, the rest HF's
    Gemma3TextConfig defaults."""
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
        "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
        "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
    }


def test_gemma3_4b_it_config_reads_as_hf_reads_it(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The nested text_config with HF's defaults filled in: the shape, windows, rope and
    parameter count HF's Gemma3Config gives, and `modelport plan` on the bare config."""
    import transformers as tf

    from modelport.config import ModelConfig
    from modelport.entrypoints.cli import main
    from modelport.models.gemma import _gemma3_ropes
    from modelport.models.sliding import layer_types, windows

    d = _gemma3_4b_it_config()
    hf = tf.Gemma3Config(**d).text_config
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.architecture == "Gemma3ForConditionalGeneration"
    for ours, theirs in [("vocab_size",) * 2, ("hidden_size",) * 2, ("intermediate_size",) * 2,
                         ("num_hidden_layers",) * 2, ("num_attention_heads",) * 2,
                         ("num_key_value_heads",) * 2, ("head_dim",) * 2,
                         ("max_position_embeddings",) * 2, ("rms_norm_eps",) * 2,
                         ("tie_word_embeddings",) * 2]:
        assert getattr(cfg, ours) == getattr(hf, theirs), ours
    assert cfg.eos_token_ids == (1, 106) and cfg.torch_dtype == "bfloat16"
    assert cfg.hf_config["query_pre_attn_scalar"] == hf.query_pre_attn_scalar == 256
    sliding = layer_types(cfg, lambda i: (i + 1) % 6 != 0)
    assert sliding == [t == "sliding_attention" for t in hf.layer_types]
    assert set(windows(cfg, sliding)) == {1024, None}
    glob, loc = _gemma3_ropes(cfg)
    assert (glob.theta, glob.scaling["rope_type"], glob.scaling["factor"]) == (1e6, "linear", 8)
    assert (loc.theta, loc.scaling) == (1e4, None)
    with torch.device("meta"):
        text_params = sum(p.numel() for p in tf.Gemma3ForCausalLM(hf).parameters())
    assert cfg.num_params == text_params  # the vision tower is not counted
    (tmp_path / "config.json").write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["plan", "--model", str(tmp_path), "--gpu", "h100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["architecture"] == "Gemma3ForConditionalGeneration"
    assert (plan["model"]["num_hidden_layers"], plan["model"]["head_dim"]) == (34, 256)
    per_token = 2 * 34 * 4 * 256 * 2  # bf16 K and V of every layer
    assert plan["kv_cache"]["bytes_per_token"] == per_token
    assert plan["model"]["num_params"] == pytest.approx(text_params, rel=1e-4)


def test_gemma3_mm_vision_tensors_are_not_read(dirs: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from modelport.loader import hf as hf_loader

    read: list[str] = []
    real = hf_loader.iter_safetensors

    def spy(files, skip=None):  # noqa: ANN001, ANN202
        for name, t in real(files, skip):
            read.append(name)
            yield name, t

    monkeypatch.setattr(hf_loader, "iter_safetensors", spy)
    _ours(dirs["gemma3_mm"])
    assert read and all(n.startswith("language_model.") for n in read)


def test_gemma3_mm_server_refuses_images_with_a_400(dirs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """An image part in a chat request is a 400 in OpenAI's error shape naming images (not
    a 500, not a schema complaint about 'text'); text chats are served."""
    import httpx

    from helpers.server_proc import start_server, stop_server

    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(dirs["gemma3_mm"]),
            "--served-model-name", "g3", "--max-model-len", "128", "--kv-cache-memory", "8MiB"]
    proc, url = start_server(argv, tmp_path / "server.log", timeout=180)
    try:
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        body = {"model": "g3", "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error"
        assert "images are not supported for this model" in err["message"]
        assert "'image_url'" in err["message"] and err["param"].startswith("messages.0.content")
        body["messages"][0]["content"] = [{"type": "input_audio", "input_audio": {}}]
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "audio input is not supported for this model" in r.json()["error"]["message"]
        body["messages"][0]["content"] = [{"type": "text", "text": "hello"}]
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        stop_server(proc)


def test_gemma3_mm_llm_chat_refuses_images(dirs: dict[str, Path]) -> None:
    llm = LLM(str(dirs["gemma3_mm"]), kv_cache_memory=4 << 20, max_model_len=128)
    image = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    with pytest.raises(ValueError, match="content part of type 'image_url'"):
        llm.chat(image, SamplingParams(max_tokens=2), use_tqdm=False)
