"""Invalid configs: each leaves only its own model unavailable, with a clear reason.

tests/fixtures/repositories/invalid holds one broken model per folder plus `valid_ok`,
which must keep serving. The same folder is also loaded next to the main repository by
test_kserve_protocols.py, so the reasons are visible over HTTP too.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest

from modelport.repository.errors import ModelConfigError
from modelport.repository.manager import RepositoryManager
from modelport.repository.model_config import autocomplete, parse_config_text
from modelport.repository.tensors import InferRequest, InferTensor
from modelport.repository.validation import validate_config

INVALID = Path(__file__).parent / "fixtures" / "repositories" / "invalid"

EXPECTED = {
    "neg_max_batch_size": r"'max_batch_size' must be non-negative value, got -4",
    "reshape_mismatch": r"input 'X' has different number of elements in 'dims' \[4\] and 'reshape' \[3\]",
    "ensemble_cycle": r"the steps form a cycle",
    "unknown_backend": r"unknown backend 'tensorrt_llm_x'; available backends: \[.*'onnxruntime'.*'python'.*'pytorch'",
    "duplicate_input": r"input 'X' is specified more than once",
    "duplicate_output": r"output 'Y' is specified more than once",
    "missing_data_type": r"input 'X' must specify 'data_type'",
    "zero_dim": r"input 'X' dimension 0 is invalid",
    "missing_dims": r"input 'X' must specify 'dims'",
    "preferred_too_big": r"preferred size 16 must be positive and not exceed max_batch_size 8",
    "batching_without_max_batch": r"dynamic batching requires 'max_batch_size' > 0",
    "name_mismatch": r"model name 'some_other_name' in config.pbtxt does not match the directory name 'name_mismatch'",
    "syntax_error": r"failed to parse .*config.pbtxt",
    "unknown_field": r"failed to parse .*max_batch_sizes",
    "bad_enum": r"failed to parse .*TYPE_FLOAT99",
    "missing_model_file": r"model file .*model.py not found",
    "no_versions": r"at least one version must be available",
    "specific_version_missing": r"version_policy names version\(s\) \[3\]",
    "negative_instance_count": r"must have count >= 1, got -1",
    "gpu_out_of_range": r"KIND_GPU but no GPU is available|invalid gpu id 99",
    "ensemble_unknown_model": r"depends on 'does_not_exist' which is not in the repository",
    "ensemble_unmapped_tensor": r"consumes ensemble tensor 'ghost' which is not mapped",
    "ensemble_output_not_produced": r"ensemble output 'Y' is not mapped from any step output",
    "ensemble_wrong_input_name": r"model 'valid_ok' has no input 'NOPE'",
    "ensemble_unused_input": r"ensemble input\(s\) \['UNUSED'\] are not used by any step",
    "ensemble_double_producer": r"ensemble tensor 'Y' is produced by step 1",
    "ensemble_dtype_mismatch": r"tensor 'X' is TYPE_INT32 but step 0 input 'X' of 'valid_ok' expects TYPE_FP32",
    "init_raises": r"RuntimeError: weights missing: cannot open /nonexistent/weights.bin",
    "no_model_class": r"defines no class TritonPythonModel",
    "priority_out_of_range": r"default priority level 5 must be in \[1, 2\]",
    "warmup_unknown_input": r"warmup 'w' sets unknown input 'NOPE'",
    "warmup_fails": r"warmup 'w' failed: .*ValueError: cannot run on zeros",
    "sequence_batching": r"state input name 'X' is also a model input",
    "no_backend": r"must specify 'backend' or 'platform'",
    "tensorrt_plan": r"platform 'tensorrt_plan' \(a TensorRT engine\) is not served here: export "
                     r"the model to ONNX \(platform 'onnxruntime_onnx', model.onnx\) or TorchScript",
    "ensemble_self_reference": r"step 0 uses the ensemble itself",
    "filename_escape": r"default_model_filename '../../../elsewhere/model.py' must be a plain file name",
    "autocomplete_conflict": r"auto_complete_config failed: ValueError: configuration specified max_batch_size 8",
}


@pytest.fixture(scope="module")
def loaded():
    """Load the whole folder once; return (index rows by name, an infer result of valid_ok)."""

    async def main():
        manager = RepositoryManager([INVALID], gpus=0)
        await manager.start()
        try:
            rows = {r["name"]: r for r in manager.index()}
            x = np.arange(4, dtype=np.float32)
            resp = await manager.infer(
                InferRequest("valid_ok", inputs={"X": InferTensor("X", "FP32", x)})
            )
            return rows, resp.outputs["Y"].data
        finally:
            await manager.stop()

    return asyncio.run(main())


def test_fixture_folder_covers_every_expectation():
    folders = {p.name for p in INVALID.iterdir() if p.is_dir()}
    assert folders == set(EXPECTED) | {"valid_ok"}
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_model_is_unavailable_with_reason(loaded, name):
    rows, _ = loaded
    row = rows[name]
    assert row["state"] == "UNAVAILABLE"
    assert re.search(EXPECTED[name], row["reason"]), row["reason"]


def test_valid_model_keeps_serving(loaded):
    rows, y = loaded
    assert rows["valid_ok"]["state"] == "READY"
    np.testing.assert_array_equal(y, np.arange(4, dtype=np.float32))


def test_gpu_ids_checked_against_visible_gpus():
    cfg = parse_config_text(
        'name: "m" backend: "pytorch" input [{name: "x" data_type: TYPE_FP32 dims: [1]}] '
        "instance_group [{kind: KIND_GPU gpus: [2]}]"
    )
    cfg = autocomplete(cfg, Path("/nonexistent/m"), gpu_count=2)
    with pytest.raises(ModelConfigError, match="invalid gpu id 2; available ids are 0..1"):
        validate_config(cfg, "m", ["pytorch"], gpu_count=2)
