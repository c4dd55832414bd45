"""The `onnxruntime` backend: `model.onnx` run by an onnxruntime InferenceSession.

Tensors map by name. The config's inputs and outputs are checked against the graph at load
so a typo is a load error, not a per-request failure.

BF16: onnxruntime's numpy bridge has no bfloat16 (neither ml_dtypes arrays in nor `.numpy()`
out), so a session with a bfloat16 tensor in its graph or its config runs through OrtValues:
inputs are wrapped as ONNX BFLOAT16 from their raw bits, outputs are copied out of the
OrtValue's CPU buffer. (The CPU execution provider has bfloat16 kernels for few operators,
e.g. Cast and Identity; a graph that needs others fails at load with onnxruntime's
NOT_IMPLEMENTED error naming the node.)
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends.base import BackendContext, InstanceSpec
from modelport.repository.backends.framework import TensorBackend
from modelport.repository.errors import ModelConfigError, ServingError
from modelport.repository.tensors import BF16, wire_of_config

_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


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
        # implicit state (sequence_batching.state): the state outputs are fetched as well
        self._state_in = [s.input_name for s in self.config.sequence_batching.state]
        for st in self.config.sequence_batching.state:
            if st.output_name not in self._outputs:
                self._outputs.append(st.output_name)
                self._out_types[st.output_name] = wire_of_config(mc.DataType.Name(st.data_type))
        self._config_bf16 = any(
            io.data_type == mc.TYPE_BF16 for io in [*self.config.input, *self.config.output]
        )

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
        for name in self._state_in:
            if name not in graph_in:
                raise ModelConfigError(
                    f"model '{self.config.name}': unexpected state input '{name}', "
                    f"allowed inputs are: {', '.join(sorted(graph_in))}"
                )
        for o in [*self.config.output, *self._state_outputs()]:
            if o.name not in graph_out:
                raise ModelConfigError(
                    f"model '{self.config.name}': unexpected inference output '{o.name}', "
                    f"allowed outputs are: {', '.join(sorted(graph_out))}"
                )
        bf16 = self._config_bf16 or any(
            "bfloat16" in t.type for t in [*session.get_inputs(), *session.get_outputs()]
        )
        return session, bf16

    def _state_outputs(self) -> list[Any]:
        listed = {o.name for o in self.config.output}
        return [
            mc.ModelOutput(name=st.output_name)
            for st in self.config.sequence_batching.state
            if st.output_name not in listed
        ]

    def run(self, handle: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session, bf16 = handle
        if not bf16:
            return dict(zip(self._outputs, session.run(self._outputs, inputs)))
        feeds = {n: _ort_value(a) for n, a in inputs.items()}
        values = session.run_with_ort_values(self._outputs, feeds)
        return {n: self._from_ort_value(n, v) for n, v in zip(self._outputs, values)}

    def _from_ort_value(self, name: str, v: Any) -> np.ndarray:
        if v.data_type() != "tensor(bfloat16)":
            return v.numpy()
        if v.device_name().lower() != "cpu":
            raise ServingError(
                f"model '{self.config.name}': BF16 output '{name}' is on device "
                f"'{v.device_name()}'; modelport reads onnxruntime BF16 outputs from CPU only"
            )
        shape = tuple(v.shape())
        count = int(np.prod(shape)) if shape else 1
        if count == 0:
            return np.empty(shape, dtype=BF16)
        buf = (ctypes.c_uint16 * count).from_address(v.data_ptr())
        return np.frombuffer(buf, dtype=np.uint16).copy().view(BF16).reshape(shape)


def _ort_value(arr: np.ndarray) -> Any:
    import onnxruntime as ort

    arr = np.ascontiguousarray(arr)
    if arr.dtype == BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), _ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(arr)
