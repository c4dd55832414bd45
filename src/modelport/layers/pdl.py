"""Programmatic dependent launch (PDL) for our Triton kernels on sm90+ GPUs.

Used by: the fused small ops, the KV write and attention kernels, the bf16 and W4 GEMVs,
the W4 dequant kernel, and the FP8 activation quantizer and W8A16 GEMV. The W4 dequant-GEMM
(5-255 rows) and the FP8 W8A8 GEMM launch plainly until they have been checked with it (the
W8A8 GEMM takes it with MODELPORT_FP8_W8A8_PDL=1).

A decode step is a chain of ~300 short kernels; between two of them the GPU drains the
first, then launches and ramps up the second. With PDL (CUDA's programmatic stream
serialization, kept as programmatic edges when the step is captured in a CUDA graph) a
kernel may be scheduled while its predecessor is still running; it waits on
``griddepcontrol.wait`` before it touches anything the predecessor produces.

The contract every kernel launched with ``kernel_kwargs()`` follows (``wait`` below):

* before ``wait``: only reads of data no kernel of this forward writes (weights, scales, the
  step's metadata, KV cache slots other than the ones this step writes); no writes at all;
* ``wait``, then ``griddepcontrol.launch_dependents`` (the successor may be scheduled from
  now on). Short kernels whose wait is long (rotary, KV write: they wait for a whole GEMV)
  let the successor be scheduled first (``trigger_first``): by the rule above its early
  part reads nothing a running kernel writes, and its own wait still returns only after
  this kernel, hence every earlier one, has finished. All of a kernel's programs are
  resident before its successor can be scheduled, so waiting successors never starve it.

Kernels without PDL (cuBLAS, torch ops) keep the full stream order on both sides.
``MODELPORT_PDL=0`` turns it off (every kernel then compiles without the wait, and launches
as before).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def enabled() -> bool:
    """PDL on: an NVIDIA GPU of compute capability 9.0+, not the Triton interpreter, and
    MODELPORT_PDL not "0"."""
    if os.environ.get("MODELPORT_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not torch.cuda.is_available() or torch.version.hip is not None:  # NVIDIA only
        return False
    return torch.cuda.get_device_capability()[0] >= 9


def launch_kwargs() -> dict[str, bool]:
    """The launch option PDL needs (``launch_pdl``), or nothing when it is off."""
    return {"launch_pdl": True} if enabled() else {}


def kernel_kwargs() -> dict[str, bool]:
    """Everything a launch of a kernel calling ``wait(PDL)`` adds: the PDL constexpr and the
    launch option, or nothing (the kernel's PDL defaults to False)."""
    return {"PDL": True, **launch_kwargs()} if enabled() else {}


try:  # importable without triton (CPU installs): only the kernels' modules call ``wait``
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
    pass
else:

    @triton.jit
    def wait(PDL: tl.constexpr, trigger_first: tl.constexpr = False):
        """Wait for the predecessor kernel's results, then let the successor be scheduled
        (trigger_first: let it be scheduled, then wait)."""
        if PDL:
            if trigger_first:
                gdc_launch_dependents()
                gdc_wait()
            else:
                gdc_wait()
                gdc_launch_dependents()
