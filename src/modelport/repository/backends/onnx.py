"""The `onnxruntime` backend: `model.onnx` run by an onnxruntime InferenceSession.

Tensors map by name. The config's inputs and outputs are checked against the graph at load
so a typo is a load error, not a per-request failure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelport.repository.backends.base import BackendContext, InstanceSpec
from modelport.repository.backends.framework import TensorBackend
from modelport.repository.errors import ModelConfigError


class OnnxRuntimeBackend(TensorBackend):
    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._path = ctx.model_file("model.onnx")
        if not self._path.is_file():
            raise ModelConfigError(
                f"model '{self.config.name}' version {ctx.version}: model file {self._path} "
                "not found"
            )
        self._outputs = [o.name for o in self.config.output]

    def load_instance(self, spec: InstanceSpec) -> Any:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if spec.kind == "GPU":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelConfigError(
                    f"model '{self.config.name}': KIND_GPU needs onnxruntime with the CUDA "
                    "execution provider"
                )
            providers = [("CUDAExecutionProvider", {"device_id": spec.device_id})]
        opts = ort.SessionOptions()
        params = {k: v.string_value for k, v in self.config.parameters.items()}
        if "intra_op_thread_count" in params:
            opts.intra_op_num_threads = int(params["intra_op_thread_count"])
        try:
            session = ort.InferenceSession(str(self._path), opts, providers=providers)
        except Exception as e:
            raise ModelConfigError(
                f"model '{self.config.name}': onnxruntime failed to load {self._path}: {e}"
            ) from None
        graph_in = {i.name for i in session.get_inputs()}
        graph_out = {o.name for o in session.get_outputs()}
        for i in self.config.input:
            if i.name not in graph_in:
                raise ModelConfigError(
                    f"model '{self.config.name}': unexpected inference input '{i.name}', "
                    f"allowed inputs are: {', '.join(sorted(graph_in))}"
                )
        for o in self.config.output:
            if o.name not in graph_out:
                raise ModelConfigError(
                    f"model '{self.config.name}': unexpected inference output '{o.name}', "
                    f"allowed outputs are: {', '.join(sorted(graph_out))}"
                )
        return session

    def run(self, handle: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = handle.run(self._outputs, inputs)
        return dict(zip(self._outputs, values))
