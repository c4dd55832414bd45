"""Triton's `sequence_batching` for stateful models: config checks and control tensors.

The scheduling itself (slots, backlog, idle release) is serving/sequence_batcher.py; this
module reads the config block and builds the control input tensors the server fills in for
the model on every request: START / END / READY (int32, fp32 or bool `*_false_true` pairs)
and CORRID (the correlation id as TYPE_UINT64 / INT64 / UINT32 / INT32 / STRING). Each is
shaped [1], plus the batch dimension ([1, 1]) when max_batch_size > 0, as in Triton.

Supported: strategies `direct` (the default; max_queue_delay_microseconds with
minimum_slot_utilization) and `oldest` (max_candidate_sequences, preferred_batch_size,
max_queue_delay_microseconds, preserve_ordering), max_sequence_idle_microseconds,
control_input, and implicit state (`state`, python, onnxruntime and pytorch backends; see
`ImplicitStates`). Refused at load: `iterative_sequence`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import InvalidArgument, ModelConfigError, ServingError
from modelport.serving.sequence_batcher import SeqEntry, SequenceBatcherConfig

_SB = mc.ModelSequenceBatching
_K = _SB.Control
DEFAULT_IDLE_US = 1_000_000  # Triton's default max_sequence_idle_microseconds
_CORRID_TYPES = {
    mc.TYPE_UINT64: np.uint64,
    mc.TYPE_INT64: np.int64,
    mc.TYPE_UINT32: np.uint32,
    mc.TYPE_INT32: np.int32,
    mc.TYPE_STRING: np.object_,
}
_BOOL_KINDS = (_K.CONTROL_SEQUENCE_START, _K.CONTROL_SEQUENCE_END, _K.CONTROL_SEQUENCE_READY)


def is_sequence(cfg: mc.ModelConfig) -> bool:
    return cfg.HasField("sequence_batching")


def _err(cfg: mc.ModelConfig, message: str) -> ModelConfigError:
    return ModelConfigError(f"model '{cfg.name}': {message}")


def validate_sequence_batching(cfg: mc.ModelConfig) -> None:
    """Raise ModelConfigError for what modelport does not run (or a malformed block)."""
    sb = cfg.sequence_batching
    if sb.state:
        _validate_states(cfg)
    if sb.iterative_sequence:
        raise _err(cfg, "sequence_batching 'iterative_sequence' is not supported by modelport")
    if sb.WhichOneof("strategy_choice") == "oldest":
        o = sb.oldest
        if o.max_candidate_sequences < 1:
            raise _err(cfg, "sequence_batching 'oldest' needs 'max_candidate_sequences' >= 1")
        for p in o.preferred_batch_size:
            if p < 1 or p > max(cfg.max_batch_size, 1):
                raise _err(
                    cfg,
                    f"sequence_batching 'oldest' preferred batch size {p} must be positive "
                    f"and not exceed max_batch_size {cfg.max_batch_size}",
                )
    inputs = {i.name for i in cfg.input}
    seen_names: set[str] = set()
    seen_kinds: set[int] = set()
    for ci in sb.control_input:
        if not ci.name:
            raise _err(cfg, "every sequence_batching control_input must have a name")
        if ci.name in seen_names:
            raise _err(cfg, f"sequence batching control input '{ci.name}' is given twice")
        if ci.name in inputs:
            raise _err(
                cfg,
                f"sequence batching control input '{ci.name}' is also a model input; control "
                "inputs are filled by the server and must not be listed under 'input'",
            )
        seen_names.add(ci.name)
        if len(ci.control) != 1:
            raise _err(
                cfg,
                f"sequence batching control input '{ci.name}' must have exactly one control, "
                f"has {len(ci.control)}",
            )
        c = ci.control[0]
        kind = _K.Kind.Name(c.kind)
        if c.kind in seen_kinds:
            raise _err(cfg, f"sequence batching specifies multiple {kind} tensors")
        seen_kinds.add(c.kind)
        pairs = [
            n
            for n in ("int32_false_true", "fp32_false_true", "bool_false_true")
            if len(getattr(c, n))
        ]
        if c.kind in _BOOL_KINDS:
            if len(pairs) != 1 or len(getattr(c, pairs[0])) != 2:
                raise _err(
                    cfg,
                    f"sequence batching control '{kind}' of input '{ci.name}' must specify "
                    "exactly one of 'int32_false_true', 'fp32_false_true' or "
                    "'bool_false_true', with two values (false, true)",
                )
        elif c.kind == _K.CONTROL_SEQUENCE_CORRID:
            if pairs:
                raise _err(
                    cfg,
                    f"sequence batching control '{kind}' of input '{ci.name}' must not specify "
                    f"'{pairs[0]}'",
                )
            if c.data_type not in _CORRID_TYPES:
                raise _err(
                    cfg,
                    f"unexpected control data type {mc.DataType.Name(c.data_type)} for {kind} "
                    f"input '{ci.name}', expected TYPE_UINT64, TYPE_INT64, TYPE_UINT32, "
                    "TYPE_INT32, or TYPE_STRING",
                )
        else:
            raise _err(cfg, f"sequence batching control '{kind}' is not supported by modelport")


STATE_BACKENDS = ("python", "onnxruntime", "pytorch")


def _validate_states(cfg: mc.ModelConfig) -> None:
    """Triton's checks of `sequence_batching.state` (its words where it has them)."""
    sb = cfg.sequence_batching
    if cfg.backend not in STATE_BACKENDS:
        raise _err(
            cfg,
            f"sequence_batching 'state' (implicit state) is supported by modelport for the "
            f"{', '.join(STATE_BACKENDS)} backends only, not '{cfg.backend}'",
        )
    inputs = {i.name for i in cfg.input}
    outputs = {o.name: o for o in cfg.output}
    controls = {ci.name for ci in sb.control_input}
    seen_in: set[str] = set()
    seen_out: set[str] = set()
    for st in sb.state:
        if not st.input_name or not st.output_name:
            raise _err(
                cfg, "every sequence_batching state must have 'input_name' and 'output_name'"
            )
        name = st.input_name
        if name in seen_in:
            raise _err(cfg, f"State input name '{name}' specified more than once.")
        if st.output_name in seen_out:
            raise _err(cfg, f"State output name '{st.output_name}' specified more than once.")
        seen_in.add(name)
        seen_out.add(st.output_name)
        if name in inputs or name in controls:
            raise _err(
                cfg,
                f"state input name '{name}' is also a model {'input' if name in inputs else 'control input'}; "
                "the server fills in state inputs and they must not be listed under 'input'",
            )
        if st.output_name in inputs:
            raise _err(cfg, f"state output name '{st.output_name}' is also a model input")
        if st.data_type in (mc.TYPE_INVALID,) or st.data_type not in mc.DataType.values():
            raise _err(cfg, f"state '{name}' must specify a valid 'data_type'")
        if st.data_type == mc.TYPE_BF16:
            raise _err(cfg, f"state '{name}': TYPE_BF16 state is not supported by modelport")
        for d in st.dims:
            if d < -1 or d == 0:
                raise _err(cfg, f"state '{name}' has invalid dimension {d} in 'dims'")
        listed = outputs.get(st.output_name)
        if listed is not None and listed.data_type != st.data_type:
            raise _err(
                cfg,
                f"state output '{st.output_name}' is listed under 'output' as "
                f"{mc.DataType.Name(listed.data_type)} but the state data type is "
                f"{mc.DataType.Name(st.data_type)}",
            )
        if st.use_growable_memory and not st.use_same_buffer_for_input_output:
            raise _err(
                cfg,
                "In order to 'use_growable_memory', you must also enable 'use_single_buffer' "
                f"for state input name '{name}'.",
            )
        if len(st.initial_state) > 1:  # a repeated field; Triton reads one per state
            raise _err(cfg, f"State input name '{name}' specified more than once.")
        if st.initial_state:
            _validate_initial_state(cfg, st)


def _validate_initial_state(cfg: mc.ModelConfig, st: Any) -> None:
    init, name = st.initial_state[0], st.input_name
    if init.data_type != st.data_type:
        raise _err(
            cfg,
            f"The data type used for 'initial_state' field of state '{name}' does not match "
            "the state data type.",
        )
    if not init.name:
        raise _err(
            cfg, f"Field 'name' must be set when using initial_state for state input '{name}'."
        )
    if len(init.dims) != len(st.dims):
        raise _err(
            cfg,
            "Number of dimensions in 'initial_state' doesn't match the size of 'state' "
            f"dimensions for state input '{name}'. {len(init.dims)} != {len(st.dims)}",
        )
    for d, sd in zip(init.dims, st.dims):
        if d == -1:
            raise _err(
                cfg,
                f"'initial_state' field for state input name '{name}' contains variable dimensions.",
            )
        if d < 1:
            raise _err(cfg, f"'initial_state' of state '{name}' has invalid dimension {d}")
        if sd != -1 and d != sd:
            raise _err(
                cfg,
                f"'initial_state' dim for input name '{name}' doesn't match 'state' dim "
                f"description. {d} != {sd}",
            )
    which = init.WhichOneof("state_data")
    if which is None:
        raise _err(cfg, f"initial_state setting expects state '{name}' to have state_data set")
    if which == "data_file":
        f = init.data_file
        if "/" in f or "\\" in f or f in ("", ".", ".."):
            raise _err(
                cfg, f"initial_state data_file '{f}' of state '{name}' must be a plain file name"
            )
        if init.data_type == mc.TYPE_STRING:
            raise _err(
                cfg,
                f"initial_state 'data_file' for TYPE_STRING state '{name}' is not supported "
                "by modelport (use zero_data)",
            )


def batcher_config(cfg: mc.ModelConfig) -> SequenceBatcherConfig:
    sb = cfg.sequence_batching
    idle_us = sb.max_sequence_idle_microseconds or DEFAULT_IDLE_US
    if sb.WhichOneof("strategy_choice") == "oldest":
        o = sb.oldest
        return SequenceBatcherConfig(
            slots_per_instance=o.max_candidate_sequences,
            idle_timeout_s=idle_us / 1e6,
            oldest=True,
            max_batch_size=max(cfg.max_batch_size, 1),
            max_queue_delay_s=o.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(o.preferred_batch_size),
            preserve_ordering=o.preserve_ordering,
        )
    return SequenceBatcherConfig(
        slots_per_instance=max(cfg.max_batch_size, 1),
        idle_timeout_s=idle_us / 1e6,
        max_queue_delay_s=sb.direct.max_queue_delay_microseconds / 1e6,
        minimum_slot_utilization=sb.direct.minimum_slot_utilization,
    )


@dataclass(frozen=True)
class _Control:
    name: str
    kind: int
    wire: str
    values: tuple  # (false, true) for START / END / READY
    dtype: type


class ControlInputs:
    """The control tensors of one request (or of a null request in an empty slot)."""

    def __init__(self, cfg: mc.ModelConfig) -> None:
        from modelport.repository.tensors import wire_of_config

        self.batched = cfg.max_batch_size > 0
        self._controls: list[_Control] = []
        self.corrid_type: int | None = None
        for ci in cfg.sequence_batching.control_input:
            c = ci.control[0]
            if c.kind == _K.CONTROL_SEQUENCE_CORRID:
                self.corrid_type = c.data_type
                wire = wire_of_config(mc.DataType.Name(c.data_type))
                self._controls.append(
                    _Control(ci.name, c.kind, wire, (), _CORRID_TYPES[c.data_type])
                )
            elif len(c.int32_false_true):
                self._controls.append(
                    _Control(ci.name, c.kind, "INT32", tuple(c.int32_false_true), np.int32)
                )
            elif len(c.fp32_false_true):
                self._controls.append(
                    _Control(ci.name, c.kind, "FP32", tuple(c.fp32_false_true), np.float32)
                )
            else:
                self._controls.append(
                    _Control(ci.name, c.kind, "BOOL", tuple(c.bool_false_true), np.bool_)
                )

    def check_corrid(self, model: str, corrid: int | str) -> None:
        """A string id for an integer CORRID control (or the reverse) cannot be passed on."""
        if self.corrid_type is None:
            return
        if (self.corrid_type == mc.TYPE_STRING) != isinstance(corrid, str):
            want = "string" if self.corrid_type == mc.TYPE_STRING else "unsigned integer"
            raise InvalidArgument(
                f"inference request to model '{model}' has correlation ID {corrid!r} but the "
                f"model's CONTROL_SEQUENCE_CORRID input expects a {want} ID "
                f"({mc.DataType.Name(self.corrid_type)})"
            )

    def tensors(self, e: SeqEntry) -> dict:
        from modelport.repository.tensors import InferTensor

        shape = (1, 1) if self.batched else (1,)
        out = {}
        for c in self._controls:
            if c.kind == _K.CONTROL_SEQUENCE_CORRID:
                if c.dtype is np.object_:
                    v = str(e.corrid).encode() if e.ready else b""
                    arr = np.full(shape, v, dtype=np.object_)
                else:
                    v = int(e.corrid) if e.ready and not isinstance(e.corrid, str) else 0
                    arr = np.full(shape, v % (2 ** (8 * np.dtype(c.dtype).itemsize)), np.uint64)
                    arr = arr.astype(c.dtype)  # wraps like Triton's byte copy
            else:
                flag = {
                    _K.CONTROL_SEQUENCE_START: e.start,
                    _K.CONTROL_SEQUENCE_END: e.end,
                    _K.CONTROL_SEQUENCE_READY: e.ready,
                }[c.kind]
                arr = np.full(shape, c.values[1 if (flag and e.ready) else 0], dtype=c.dtype)
            out[c.name] = InferTensor(c.name, c.wire, arr)
        return out


@dataclass(frozen=True)
class _StateSpec:
    input_name: str
    output_name: str
    wire: str
    initial: np.ndarray  # with the batch dimension when max_batch_size > 0
    listed: bool  # output_name is also under 'output': the client may request it


class ImplicitStates:
    """Triton's implicit state: the server keeps each state tensor of every sequence.

    A sequence's START request gets the `initial_state` (zero_data, or data_file read from
    <model>/initial_state/ in row-major order) as the input `input_name`; with no
    initial_state, Triton passes uninitialized memory with every -1 dim as 1 -- modelport
    passes zeros of that shape. Every later request gets the `output_name` tensor the model
    produced for the previous request of that sequence (its shape and all, so -1 dims
    follow the model). A request whose execution fails leaves the state as it was (START
    still resets it); a response without the state output fails that request. The state
    is dropped at END, on idle release and on unload. State outputs reach the client only
    when the config also lists them under 'output' (Triton's rule for debugging).
    `use_same_buffer_for_input_output` / `use_growable_memory` are accepted and ignored.
    """

    def __init__(self, cfg: mc.ModelConfig, model_dir: Path) -> None:
        from modelport.repository.tensors import numpy_dtype, wire_of_config

        self.model = cfg.name
        batched = cfg.max_batch_size > 0
        listed = {o.name for o in cfg.output}
        self.specs: list[_StateSpec] = []
        for st in cfg.sequence_batching.state:
            wire = wire_of_config(mc.DataType.Name(st.data_type))
            dtype = numpy_dtype(wire)
            init = st.initial_state[0] if st.initial_state else None
            if init is not None:
                shape = [int(d) for d in init.dims]
            else:
                shape = [1 if d == -1 else int(d) for d in st.dims]
            full = ([1] if batched else []) + shape
            count = int(np.prod(shape)) if shape else 1
            if init is not None and init.WhichOneof("state_data") == "data_file":
                path = model_dir / "initial_state" / init.data_file
                try:
                    raw = path.read_bytes()
                except OSError as e:
                    raise ModelConfigError(
                        f"model '{cfg.name}': cannot read initial_state data_file of state "
                        f"'{st.input_name}': {e}"
                    ) from None
                need = count * dtype.itemsize
                if len(raw) < need:
                    raise ModelConfigError(
                        f"model '{cfg.name}': initial_state setting expects {need} bytes, but "
                        f"the data provided from {init.data_file} only has {len(raw)} bytes."
                    )
                arr = np.frombuffer(raw[:need], dtype=dtype).reshape(full).copy()
            elif wire == "BYTES":
                arr = np.full(full, b"", dtype=np.object_)
            else:
                arr = np.zeros(full, dtype=dtype)
            self.specs.append(
                _StateSpec(st.input_name, st.output_name, wire, arr, st.output_name in listed)
            )
        self._store: dict[Hashable, dict[str, Any]] = {}

    @property
    def output_names(self) -> list[str]:
        return [s.output_name for s in self.specs]

    @property
    def active(self) -> int:
        return len(self._store)

    def inputs(self, e: SeqEntry) -> dict:
        """The state inputs of a (ready) request; START (re)initializes the sequence."""
        from modelport.repository.tensors import InferTensor

        if e.start or e.corrid not in self._store:
            self._store[e.corrid] = {
                s.input_name: InferTensor(s.input_name, s.wire, s.initial.copy())
                for s in self.specs
            }
        return dict(self._store[e.corrid])

    def take_outputs(self, e: SeqEntry, result: Any) -> tuple[Any, dict | None]:
        """Split a ready request's result into (what the client gets, the new state or None
        when the request failed / lacked a state output)."""
        from modelport.repository.tensors import InferResponse, InferTensor

        if not isinstance(result, InferResponse):
            return result, None
        new: dict[str, Any] = {}
        for s in self.specs:
            t = result.outputs.get(s.output_name)
            if t is None:
                return (
                    ServingError(
                        f"model '{self.model}' did not produce the state output "
                        f"'{s.output_name}' for sequence {e.corrid} (sequence_batching "
                        f"state '{s.input_name}'); an implicit-state model must return it "
                        "in every response"
                    ),
                    None,
                )
            if t.datatype != s.wire:
                return (
                    ServingError(
                        f"model '{self.model}' produced state output '{s.output_name}' of "
                        f"type {t.datatype}, the state config declares {s.wire}"
                    ),
                    None,
                )
            new[s.input_name] = InferTensor(s.input_name, s.wire, np.array(t.data, copy=True))
        hidden = {s.output_name for s in self.specs if not s.listed}
        if hidden:
            outputs = {n: t for n, t in result.outputs.items() if n not in hidden}
            result = InferResponse(
                result.model_name,
                result.model_version,
                outputs,
                id=result.id,
                parameters=result.parameters,
                final=result.final,
            )
        return result, new

    def store(self, corrid: Hashable, state: dict) -> None:
        self._store[corrid] = state

    def drop(self, corrid: Hashable) -> None:
        self._store.pop(corrid, None)

    def clear(self) -> None:
        self._store.clear()


__all__ = [
    "ControlInputs",
    "ImplicitStates",
    "DEFAULT_IDLE_US",
    "batcher_config",
    "is_sequence",
    "validate_sequence_batching",
]
