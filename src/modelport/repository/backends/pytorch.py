"""The `pytorch` backend: a TorchScript `model.pt` run with torch.jit.

Inputs are passed positionally. As in Triton, names of the form `NAME__<i>` fix the
position; otherwise the order of `input` in config.pbtxt does. Outputs map the same way:
a single tensor is the first output, a tuple/list maps by position, a dict by name.
TYPE_BF16 tensors reach the module as torch.bfloat16 and come back from it the same way.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends.base import BackendContext, InstanceSpec
from modelport.repository.backends.framework import TensorBackend
from modelport.repository.errors import ModelConfigError
from modelport.repository.tensors import from_torch, to_torch

_INDEXED = re.compile(r".*__(\d+)$")


def _ordered(names: list[str]) -> list[str]:
    idx = [_INDEXED.match(n) for n in names]
    if names and all(idx):
        return [n for _, n in sorted(zip((int(m.group(1)) for m in idx if m), names))]
    return names


class TorchScriptBackend(TensorBackend):
    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        for io in [*self.config.input, *self.config.output]:
            if io.data_type == mc.TYPE_STRING:
                raise ModelConfigError(
                    f"model '{self.config.name}': the pytorch backend does not support "
                    f"TYPE_STRING tensor '{io.name}'"
                )
        self._input_order = _ordered([i.name for i in self.config.input])
        self._output_order = _ordered([o.name for o in self.config.output])
        self._path = ctx.model_file("model.pt")
        if not self._path.is_file():
            raise ModelConfigError(
                f"model '{self.config.name}' version {ctx.version}: model file {self._path} "
                "not found"
            )

    def load_instance(self, spec: InstanceSpec) -> Any:
        import torch

        device = torch.device(f"cuda:{spec.device_id}" if spec.kind == "GPU" else "cpu")
        try:
            module = torch.jit.load(str(self._path), map_location=device)
        except Exception as e:
            raise ModelConfigError(
                f"model '{self.config.name}': failed to load TorchScript {self._path}: {e}"
            ) from None
        module.eval()
        return module, device

    def run(self, handle: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        module, device = handle
        args = [to_torch(inputs[n]).to(device) for n in self._input_order if n in inputs]
        with torch.inference_mode():
            result = module(*args)
        if isinstance(result, torch.Tensor):
            result = [result]
        if isinstance(result, dict):
            pairs = [(k, v) for k, v in result.items() if k in self._output_order]
        else:
            pairs = list(zip(self._output_order, result))
        return {k: from_torch(v) for k, v in pairs}
