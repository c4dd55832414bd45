"""The `pytorch` backend: a TorchScript `model.pt` run with torch.jit.

Inputs are passed positionally, ordered by the pytorch backend's naming conventions: when
every input name is an argument of the module's `forward`, by the forward's argument order;
else, when every name has the form `NAME__<i>`, by <i>; otherwise by the order of `input`
in config.pbtxt. Outputs map by `NAME__<i>` or config order: a single tensor is the first
output, a tuple/list maps by position, a dict by name.
TYPE_BF16 tensors reach the module as torch.bfloat16 and come back from it the same way.

Implicit state (`sequence_batching.state`): each state `input_name` is one more input,
placed after the config's inputs (or by forward argument name / `__<i>` index, as above);
each state `output_name` not listed under `output` is one more output after the config's.
TorchScript does not declare output types, so a state model is run once at load with zero
inputs and its initial state, and a state output of another data type or shape than the
state config is a load error (a null request of the sequence batcher feeds zeros as well).

Sequence control inputs (`sequence_batching.control_input`: START / END / READY / CORRID)
are more forward inputs, as in Triton, with the values the sequence batcher fills in
(modelport.repository.sequence.ControlInputs: shape [1], [B, 1] batched, one row per
sequence; a null request in an empty slot has READY false and CORRID 0). Triton's pytorch
backend places a control by the `<i>` of its required `NAME__<i>` name, wherever the
config's inputs go; modelport also takes other names. Our rule: the config's inputs and
states go as above; a control goes to the position of the forward argument of its name,
else to <i> of a `NAME__<i>` name, else to the first free position, in config order (so by
default after the config's inputs and then the states). Two names on one position are a
load error. A sequence model's forward must take exactly the config's inputs, states and
controls (Triton's count check); the load error lists what the forward would be given.
An integer CORRID (TYPE_UINT64 / INT64 / UINT32 / INT32) is a tensor of that dtype
(torch.uint64 for UINT64). A TYPE_STRING CORRID reaches the forward as a List[str] (one id
per row, "" for a null request) -- TorchScript tensors cannot hold strings, so its forward
argument must be declared List[str], else the model fails to load.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends.base import BackendContext, InstanceSpec
from modelport.repository.backends.framework import TensorBackend
from modelport.repository.errors import ModelConfigError
from modelport.repository.tensors import (
    WIRE_TO_CONFIG,
    from_torch,
    numpy_dtype,
    to_torch,
    wire_of_config,
    wire_of_numpy,
)

_INDEXED = re.compile(r".*__(\d+)$")


def _ordered(names: list[str]) -> list[str]:
    idx = [_INDEXED.match(n) for n in names]
    if names and all(idx):
        return [n for _, n in sorted(zip((int(m.group(1)) for m in idx if m), names))]
    return names


def _forward_schema(module: Any) -> list[tuple[str, str]] | None:
    """The forward's (argument name, type) pairs (no `self`); None when they cannot be read."""
    try:
        args = list(module.forward.schema.arguments)
    except Exception:
        return None
    if args and args[0].type.kind() == "ClassType":
        args = args[1:]
    return [(a.name, str(a.type)) for a in args]


class TorchScriptBackend(TensorBackend):
    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        states = list(self.config.sequence_batching.state)
        for io in [*self.config.input, *self.config.output, *states]:
            if io.data_type == mc.TYPE_STRING:
                name = getattr(io, "name", "") or io.input_name
                raise ModelConfigError(
                    f"model '{self.config.name}': the pytorch backend does not support "
                    f"TYPE_STRING tensor '{name}'"
                )
        listed = {o.name for o in self.config.output}
        self._states = states
        self._state_in = [st.input_name for st in states]
        state_out = [st.output_name for st in states if st.output_name not in listed]
        for st in states:
            if st.output_name not in listed:
                self._out_types[st.output_name] = wire_of_config(mc.DataType.Name(st.data_type))
        self._input_names = [i.name for i in self.config.input] + self._state_in
        self._input_order = _ordered(self._input_names)
        self._sequence = self.config.HasField("sequence_batching")
        self._controls = {
            ci.name: ci.control[0] for ci in self.config.sequence_batching.control_input
        }
        self._output_order = _ordered([o.name for o in self.config.output] + state_out)
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
        schema = _forward_schema(module)
        order = self._bind_inputs(None if schema is None else [n for n, _ in schema])
        strings = self._string_controls(order, schema)
        handle = (module, device, order, strings)
        if self._states:
            self._probe_states(handle)
        return handle

    def _bind_inputs(self, fwd: list[str] | None) -> list[str]:
        """The input names in the order the forward takes them (see the module doc)."""
        names = self._input_names
        if fwd is None:
            order = self._input_order
        elif all(n in fwd for n in names):
            order = sorted(names, key=fwd.index)
        else:
            by_name = [i.name for i in self.config.input if i.name in fwd]
            missing = [n for n in self._state_in if n not in fwd]
            if self._states and by_name and missing:
                raise ModelConfigError(
                    f"model '{self.config.name}': state input '{missing[0]}' is not an "
                    f"argument of the TorchScript forward (arguments: {', '.join(fwd)}); "
                    "inputs named by forward argument need every sequence_batching state "
                    "'input_name' to be a forward argument too"
                )
            order = self._input_order
        if self._controls:
            order = self._place_controls(order, fwd)
        if self._sequence and fwd is not None and len(fwd) != len(order):
            raise ModelConfigError(
                f"unable to load model '{self.config.name}', configuration expects "
                f"{len(order)} inputs, model provides {len(fwd)}: the TorchScript forward "
                f"would be called with {', '.join(self._describe(n) for n in order)} "
                f"(forward arguments: {', '.join(fwd) or 'none'})"
            )
        return order

    def _place_controls(self, base: list[str], fwd: list[str] | None) -> list[str]:
        """`base` (inputs and states, in forward order) with the control inputs placed."""
        slots: dict[int, str] = dict(enumerate(base))
        indexed = [_INDEXED.match(n) for n in base]
        if fwd is not None and all(n in fwd for n in base):
            slots = {fwd.index(n): n for n in base}
        elif base and all(indexed):
            slots = {int(m.group(1)): n for m, n in zip(indexed, base) if m}
        rest = []
        for name in self._controls:
            m = _INDEXED.match(name)
            if fwd is not None and name in fwd:
                pos = fwd.index(name)
            elif m:
                pos = int(m.group(1))
            else:
                rest.append(name)
                continue
            if pos in slots:
                raise ModelConfigError(
                    f"model '{self.config.name}': sequence_batching control input '{name}' "
                    f"would be forward argument {pos}, which is already given "
                    f"{self._describe(slots[pos])}"
                )
            slots[pos] = name
        free = (i for i in range(len(slots) + len(rest)) if i not in slots)
        slots.update(zip(free, rest))
        return [slots[i] for i in sorted(slots)]

    def _describe(self, name: str) -> str:
        if name in self._controls:
            kind = mc.ModelSequenceBatching.Control.Kind.Name(self._controls[name].kind)
            return f"'{name}' (control {kind.removeprefix('CONTROL_SEQUENCE_')})"
        if name in self._state_in:
            return f"'{name}' (state)"
        return f"'{name}'"

    def _string_controls(
        self, order: list[str], schema: list[tuple[str, str]] | None
    ) -> frozenset[str]:
        """The TYPE_STRING CORRID controls, which go to the forward as List[str]."""
        names = [n for n, c in self._controls.items() if c.data_type == mc.TYPE_STRING]
        for name in names:
            pos = order.index(name)
            arg = schema[pos] if schema is not None and pos < len(schema) else None
            if arg is None or arg[1] != "List[str]":
                have = f"argument '{arg[0]}' is {arg[1]}" if arg else "argument is unknown"
                raise ModelConfigError(
                    f"model '{self.config.name}': the TYPE_STRING CONTROL_SEQUENCE_CORRID "
                    f"input '{name}' cannot be a TorchScript tensor (tensors hold no "
                    f"strings); its forward argument (position {pos}) must be declared "
                    f"List[str], the {have}. Or use a TYPE_UINT64 / TYPE_INT64 CORRID"
                )
        return frozenset(names)

    def _probe_states(self, handle: Any) -> None:
        """Run the forward once on zeros + the initial state; check the state outputs."""
        from modelport.repository.sequence import ControlInputs, ImplicitStates
        from modelport.serving.sequence_batcher import SeqEntry

        batched = self.config.max_batch_size > 0
        inputs: dict[str, np.ndarray] = {}
        for i in self.config.input:
            dims = list(i.reshape.shape) if i.HasField("reshape") else list(i.dims)
            shape = ([1] if batched else []) + [1 if d == -1 else int(d) for d in dims]
            inputs[i.name] = np.zeros(
                shape, numpy_dtype(wire_of_config(mc.DataType.Name(i.data_type)))
            )
        for spec in ImplicitStates(self.config, self.ctx.model_dir).specs:
            inputs[spec.input_name] = spec.initial.copy()
        null = SeqEntry(item=None, slot=0, corrid=0)  # as the batcher's null request
        for name, t in ControlInputs(self.config).tensors(null).items():
            inputs[name] = t.data
        try:
            outputs = self.run(handle, inputs)
        except Exception as e:
            raise ModelConfigError(
                f"model '{self.config.name}': the TorchScript forward failed on zero inputs "
                "and the initial state at load (an implicit-state model must accept them: "
                f"the sequence batcher's null requests are zeros): {type(e).__name__}: {e}"
            ) from None
        for st in self._states:
            name = st.output_name
            want = wire_of_config(mc.DataType.Name(st.data_type))
            arr = outputs.get(name)
            if arr is None:
                raise ModelConfigError(
                    f"model '{self.config.name}': the TorchScript forward returned no output "
                    f"for state output '{name}' (sequence_batching state '{st.input_name}'; "
                    f"outputs are taken in the order {', '.join(self._output_order)})"
                )
            have = wire_of_numpy(arr.dtype)
            if have != want:
                raise ModelConfigError(
                    f"model '{self.config.name}': state output '{name}' of the TorchScript "
                    f"model has data type {WIRE_TO_CONFIG.get(have, have)}, the "
                    f"sequence_batching state declares {mc.DataType.Name(st.data_type)}"
                )
            got = list(arr.shape[1:] if batched else arr.shape)
            dims = list(st.dims)
            if len(got) != len(dims) or any(d != -1 and d != g for d, g in zip(dims, got)):
                raise ModelConfigError(
                    f"model '{self.config.name}': state output '{name}' of the TorchScript "
                    f"model has shape {got}{' (without the batch dimension)' if batched else ''}"
                    f", the sequence_batching state declares dims {dims}"
                )

    def run(self, handle: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        module, device, order, strings = handle
        args = [
            [bytes(x).decode("utf-8", "replace") for x in inputs[n].reshape(-1)]
            if n in strings
            else to_torch(inputs[n]).to(device)
            for n in order
            if n in inputs
        ]
        with torch.inference_mode():
            result = module(*args)
        if isinstance(result, torch.Tensor):
            result = [result]
        if isinstance(result, dict):
            pairs = [(k, v) for k, v in result.items() if k in self._output_order]
        else:
            pairs = list(zip(self._output_order, result))
        return {k: from_torch(v) for k, v in pairs}
