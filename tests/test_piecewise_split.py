"""The attention split point that piecewise CUDA graphs (runner/piecewise_graphs.py) cut the
forward at, exercised on CPU with a recorder that runs attention itself."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.tiny_models import TINY_PROMPT, make_tiny_llama_dir
from modelport.config import LoadConfig
from modelport.layers.attention import (
    ForwardContext,
    build_single_sequence_metadata,
    forward_context,
)
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.runner.piecewise_graphs import bucket_for, token_buckets


class _RunningRecorder:
    """Stands in for the capture recorder: records each split, then does what a replay does
    (the layer's attention into one shared output buffer)."""

    def __init__(self, meta, out: torch.Tensor) -> None:
        self.meta, self.out, self.calls = meta, out, []

    def split(self, attn, q, kv_cache):
        self.calls.append((attn.layer_idx, kv_cache.clone()))
        o = attn.backend(q, kv_cache, self.meta, attn.scale)
        self.out[: q.shape[0]].copy_(o)
        return self.out[: q.shape[0]]


def test_split_after_the_kv_write_gives_the_plain_forward(tmp_path: Path, monkeypatch) -> None:
    from modelport.layers import cpu_kernels

    # the module tree split vs unsplit (a float32 Llama's CPU steps would otherwise take the
    # C step, which the piecewise forward never does)
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    src = resolve_model(str(make_tiny_llama_dir(tmp_path / "m")))
    cfg = load_model_config(src)
    model = load_model(src, cfg, LoadConfig(), torch.float32, torch.device("cpu"))
    ids = TINY_PROMPT[:40]
    t, bs = len(ids), 16

    def run(recorder):
        meta = build_single_sequence_metadata(t, bs)
        kv = [torch.zeros(2, -(-t // bs), bs, cfg.num_key_value_heads, cfg.head_dim)
              for _ in range(cfg.num_hidden_layers)]
        rec = recorder(meta) if recorder else None
        with torch.no_grad(), forward_context(ForwardContext(meta, kv, piecewise=rec)):
            hidden = model(torch.tensor(ids), torch.arange(t))
        return hidden, kv, rec

    plain, kv_plain, _ = run(None)
    out = torch.full((t, cfg.num_attention_heads, cfg.head_dim), float("nan"))
    split, kv_split, rec = run(lambda meta: _RunningRecorder(meta, out))
    torch.testing.assert_close(split, plain, atol=0, rtol=0)
    assert [layer for layer, _ in rec.calls] == list(range(cfg.num_hidden_layers))
    for (layer, cache_at_split), final in zip(rec.calls, kv_plain):
        # the step's K/V are already in the layer's cache when the graph would end
        assert torch.equal(cache_at_split, final), layer
    assert all(torch.equal(a, b) for a, b in zip(kv_split, kv_plain))


def test_token_buckets_and_padding_choice() -> None:
    assert token_buckets(8192) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert token_buckets(600) == [16, 32, 64, 128, 256, 512]
    assert token_buckets(100) == [16, 32, 64]
    assert token_buckets(8) == []
    assert bucket_for(1, [256, 512]) == 256
    assert bucket_for(257, [256, 512]) == 512
    assert bucket_for(513, [256, 512]) is None
