"""When the Triton kernels launch with programmatic dependent launch (layers/pdl.py).

The GPU side (PDL on and off giving the same bits) is tests/test_gpu_engine.py; here the
gate: only NVIDIA GPUs of compute capability 9.0+, never in Triton's interpreter, and
MODELPORT_PDL=0 turns it off.
"""

from __future__ import annotations

import pytest
import torch

from modelport.layers import pdl


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA device whose capability the test sets."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap["value"])
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("MODELPORT_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pdl.enabled.cache_clear()
    yield cap
    pdl.enabled.cache_clear()


def test_hopper_and_newer_launch_with_pdl(gpu):
    for cap in [(9, 0), (10, 0), (12, 0)]:
        gpu["value"] = cap
        pdl.enabled.cache_clear()
        assert pdl.enabled() and pdl.launch_kwargs() == {"launch_pdl": True}, cap
        assert pdl.kernel_kwargs() == {"PDL": True, "launch_pdl": True}


def test_older_gpus_rocm_interpreter_and_the_switch_turn_it_off(gpu, monkeypatch):
    gpu["value"] = (8, 9)
    pdl.enabled.cache_clear()
    assert not pdl.enabled() and pdl.launch_kwargs() == {} and pdl.kernel_kwargs() == {}
    gpu["value"] = (9, 0)
    for env, val in [("MODELPORT_PDL", "0"), ("TRITON_INTERPRET", "1")]:
        monkeypatch.setenv(env, val)
        pdl.enabled.cache_clear()
        assert not pdl.enabled() and pdl.launch_kwargs() == {}, env
        monkeypatch.delenv(env)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    pdl.enabled.cache_clear()
    assert not pdl.enabled()


def test_no_cuda_no_pdl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pdl.enabled.cache_clear()
    try:
        assert not pdl.enabled() and pdl.launch_kwargs() == {}
    finally:
        pdl.enabled.cache_clear()
