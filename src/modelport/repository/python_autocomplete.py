"""Python models that complete their own config (`TritonPythonModel.auto_complete_config`).

Why a throwaway process: the hook lives in user code, which must never run in the server
process; and it has to run before the config is validated, so before any instance exists.
Only a model.py that mentions `auto_complete_config` pays for the extra process start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import ModelConfigError
from modelport.repository.model_config import config_from_json, config_to_json
from modelport.repository.stub_process import run_auto_complete


async def python_auto_complete(
    cfg: mc.ModelConfig, model_dir: Path, version: int
) -> mc.ModelConfig:
    filename = cfg.default_model_filename or "model.py"
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        return cfg  # validation rejects it; never run a file outside the model folder
    model_file = model_dir / str(version) / filename
    try:
        source = model_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return cfg  # the backend reports the missing file
    if "auto_complete_config" not in source:
        return cfg
    loop = asyncio.get_running_loop()
    try:
        completed = await loop.run_in_executor(
            None, run_auto_complete, str(model_file), str(model_file.parent), config_to_json(cfg)
        )
    except Exception as e:
        raise ModelConfigError(f"model '{cfg.name}': auto_complete_config failed: {e}") from None
    if completed is None:
        return cfg
    return config_from_json(completed)
