"""On-disk cache for slow conversions (GGUF -> dequantized safetensors, GGUF -> tokenizer).

Entries are keyed by the source file's resolved path, size and mtime, so replacing the
file invalidates them. Writes go to a temporary folder renamed into place, so a crash or
two processes starting at once never leave a half-written entry that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache_dir() -> Path:
    """$MODELPORT_CACHE, else ~/.cache/modelport."""
    env = os.environ.get("MODELPORT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelport"


def entry_dir(source_file: Path, kind: str, cache_dir: Path | None = None) -> Path:
    """The cache folder for one (file, kind of conversion); it may not exist yet."""
    st = source_file.stat()
    key = f"{source_file.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / kind / f"{source_file.stem}-{digest}"


def build_entry(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_folder)`` and move the result to ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
