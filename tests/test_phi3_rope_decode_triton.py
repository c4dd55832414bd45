"""Phi-3's LongRoPE table (and a YaRN table, whose attention factor scales it too and whose
positions run past max_position_embeddings) in the Triton decode kernel's built-in rotary
(decode-only steps), without a GPU: the kernel in the Triton interpreter against rotary + the reference backend,
with the long factors and the attention factor baked into the table, and with a sliding
window (Phi-3-mini-4k). The model-level checks: tests/test_models_more.py."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

_CHECK = """
import torch
import test_gpu_attention as tga
from modelport.layers import triton_attention as ta
from modelport.layers.attention import AttentionMetadata, reference_paged_attention, write_kv
from modelport.layers.longrope import longrope_rotary
from modelport.layers.rotary import RopeSettings, RotaryEmbedding

tga.DEV = "cpu"
scale = 32 ** -0.5

def fresh(meta):
    return AttentionMetadata(**{**meta.__dict__, "backend_state": {}})

def check(rotary, kw):
    \"\"\"The decode kernel with the step's rotary from ``rotary``'s table against rotary +
    the reference backend; returns the relative error.\"\"\"
    assert ta.rope_fits(torch.zeros(1, 4, 32, dtype=torch.float16),
                        torch.zeros(2, 1, 16, 2, 32, dtype=torch.float16),
                        type("M", (), {"max_query_len": 1})(), rotary)
    q, k, v, cache, meta = tga._batch([(37, 1), (16, 1), (100, 1), (0, 1)], 4, 2, 32, 16,
                                      seed=3, dtype=torch.float16)
    pos = (meta.seq_lens.long() - 1).clamp(min=0)
    fused_cache = cache.clone()
    out = ta.triton_paged_attention(q.clone(), fused_cache, fresh(meta), scale,
                                    rope=(k.clone(), v.clone(), pos, rotary.cos_sin_cache),
                                    **kw)
    q2, k2 = (t.view(like.shape) for t, like in zip(rotary(pos, q, k), (q, k)))
    write_kv(cache, k2, v, meta.slot_mapping)
    assert (fused_cache.float() - cache.float()).abs().max().item() < 2e-3
    ref = reference_paged_attention(q2.float(), cache.float(), fresh(meta), scale, **kw)
    rel = tga._rel(out, ref)
    assert rel < 2e-3, (kw, rel)
    return rel
"""

_SCRIPT = _CHECK + """
scaling = {"rope_type": "longrope", "original_max_position_embeddings": 64,
           "short_factor": [1.0 + 0.05 * i for i in range(16)],
           "long_factor": [1.0 + 0.9 * i for i in range(16)]}
settings = RopeSettings(10000.0, scaling, 4096)
for max_model_len, kw in [(4096, {}), (4096, {"sliding_window": 9}), (64, {})]:
    rotary = longrope_rotary(32, settings, 32, max_model_len).to(torch.float16)
    rel = check(rotary, kw)
    print("ok longrope decode rope", max_model_len, kw, f"{rel:.1e}")
"""

# yarn: the attention factor inside the table, positions (up to 99) past the model's 32
_YARN_SCRIPT = _CHECK + """
scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
rotary = RotaryEmbedding(32, RopeSettings(10000.0, scaling, 32, 128)).to(torch.float16)
assert rotary.cos_sin_cache.shape[0] == 128
print("ok yarn decode rope", f"{check(rotary, {}):.1e}")
"""


def test_longrope_table_in_the_decode_kernels_rotary_in_interpreter() -> None:
    pytest.importorskip("triton.backends.nvidia")
    from test_triton_offline import _interpret

    assert _interpret(_SCRIPT).count("ok longrope decode rope") == 3


def test_yarn_table_in_the_decode_kernels_rotary_in_interpreter() -> None:
    pytest.importorskip("triton.backends.nvidia")
    from test_triton_offline import _interpret

    assert "ok yarn decode rope" in _interpret(_YARN_SCRIPT)
