"""Model archives: .mar (zip), .tar.gz and unpacked folders, plus MAR-INF/MANIFEST.json.

Archives come from users and, through the management API, from the network, so extraction
refuses anything that would land outside the target folder: absolute names, `..` parts,
symlinks, hard links and device files. A rejected archive raises an InvalidModelException
and leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from modelport.torchserve.errors import TSError, invalid_model

MANIFEST_PATH = "MAR-INF/MANIFEST.json"


@dataclass(frozen=True)
class Manifest:
    """The fields of MANIFEST.json that serving needs; `raw` keeps the whole document."""

    model_name: str
    model_version: str
    handler: str
    serialized_file: str | None = None
    model_file: str | None = None
    requirements_file: str | None = None
    config_file: str | None = None
    envelope: str | None = None
    runtime: str = "python"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.handler:
            raise invalid_model(f"manifest of model {self.model_name!r} names no handler")


def read_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_PATH
    if not path.is_file():
        raise invalid_model(f"{MANIFEST_PATH} not found in the model archive")
    try:
        raw = json.loads(path.read_text())
        model = raw["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise invalid_model(f"malformed {MANIFEST_PATH}: {e}") from e
    if not isinstance(model, dict) or not model.get("modelName"):
        raise invalid_model(f"{MANIFEST_PATH} has no model.modelName")
    return Manifest(
        model_name=str(model["modelName"]),
        model_version=str(model.get("modelVersion") or "1.0"),
        handler=str(model.get("handler") or ""),
        serialized_file=model.get("serializedFile"),
        model_file=model.get("modelFile"),
        requirements_file=model.get("requirementsFile"),
        config_file=model.get("configFile"),
        envelope=model.get("envelope"),
        runtime=str(raw.get("runtime") or "python"),
        raw=raw,
    )


def _check_member_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or any(part == ".." for part in p.parts) or (p.parts and ":" in p.parts[0]):
        raise invalid_model(f"archive entry {name!r} points outside the model directory")
    return p


def _inside(dest: Path, rel: PurePosixPath) -> Path:
    target = (dest / rel).resolve()
    if target != dest and dest not in target.parents:
        raise invalid_model(f"archive entry {str(rel)!r} points outside the model directory")
    return target


def _extract_zip(src: Path, dest: Path) -> None:
    with zipfile.ZipFile(src) as zf:
        for info in zf.infolist():
            rel = _check_member_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise invalid_model(f"archive entry {info.filename!r} is a symlink")
            target = _inside(dest, rel)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def _extract_tar(src: Path, dest: Path) -> None:
    with tarfile.open(src) as tf:
        members = tf.getmembers()
        for m in members:
            rel = _check_member_name(m.name)
            if not (m.isfile() or m.isdir()):
                raise invalid_model(f"archive entry {m.name!r} is not a regular file")
            _inside(dest, rel)
        for m in members:
            target = _inside(dest, _check_member_name(m.name))
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fin = tf.extractfile(m)
            assert fin is not None
            with fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def _manifest_root(dest: Path) -> Path:
    """tgz archives from torch-model-archiver wrap everything in a <model-name>/ folder."""
    if (dest / MANIFEST_PATH).is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST_PATH).is_file():
        return subdirs[0]
    return dest


def unpack(src: Path, dest: Path) -> Path:
    """Make `src` (archive or folder) available as a model folder; returns that folder.

    Folders are used in place. Archives are extracted into `dest` (created, must not exist).
    """
    src = Path(src)
    if src.is_dir():
        return src
    if not src.is_file():
        raise TSError(404, "ModelNotFoundException", f"model archive not found: {src.name}")
    dest = Path(dest)
    dest.mkdir(parents=True)
    dest = dest.resolve()
    try:
        if zipfile.is_zipfile(src):
            _extract_zip(src, dest)
        elif tarfile.is_tarfile(src):
            _extract_tar(src, dest)
        else:
            raise invalid_model(f"{src.name} is neither a zip (.mar) nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise invalid_model(f"cannot extract {src.name}: {e}") from e
    except TSError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return _manifest_root(dest)
