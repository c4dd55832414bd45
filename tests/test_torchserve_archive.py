"""Archive formats, MANIFEST.json, and extraction that cannot escape its folder."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from modelport.torchserve.archive import read_manifest, unpack
from modelport.torchserve.errors import TSError

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

HERE = Path(__file__).parent / "fixtures" / "torchserve"


@pytest.mark.parametrize("fmt", ["default", "tgz", "no-archive"])
def test_archiver_formats_unpack_to_a_model_dir(tmp_path, fmt):
    src = ts_archives.echo_archive(
        tmp_path / "store", tmp_path / "work", name="echo", version="3.1", archive_format=fmt
    )
    model_dir = unpack(src, tmp_path / "x")
    m = read_manifest(model_dir)
    assert (m.model_name, m.model_version, m.handler) == ("echo", "3.1", "echo_handler.py")
    assert (model_dir / "greeting.txt").read_text() == "hello"
    assert (model_dir / "echo_handler.py").is_file()
    if fmt == "no-archive":
        assert model_dir == src  # folders are served in place


def test_manifest_fields(tmp_path):
    cfg = tmp_path / "model-config.yaml"
    cfg.write_text("batchSize: 2\n")
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\n")
    src = ts_archives.archive(tmp_path / "s", "m", HERE / "func_handler.py", config_file=cfg)
    m = read_manifest(unpack(src, tmp_path / "x"))
    assert m.config_file == "model-config.yaml" and m.runtime == "python"
    assert m.raw["model"]["modelName"] == "m"


def _zip(path: Path, entries: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    return path


MANIFEST = json.dumps({"model": {"modelName": "m", "handler": "h.py", "modelVersion": "1"}})


@pytest.mark.parametrize(
    "bad_name", ["../escape.txt", "a/../../escape.txt", "/tmp/abs_escape.txt", "..\\escape.txt"]
)
def test_zip_path_traversal_is_refused(tmp_path, bad_name):
    src = _zip(tmp_path / "evil.mar", {"MAR-INF/MANIFEST.json": MANIFEST, bad_name: "x"})
    dest = tmp_path / "out" / "model"
    with pytest.raises(TSError) as ei:
        unpack(src, dest)
    assert ei.value.code == 400 and ei.value.type == "InvalidModelException"
    assert not dest.exists(), "a refused archive leaves nothing behind"
    assert not (tmp_path / "out" / "escape.txt").exists()
    assert not Path("/tmp/abs_escape.txt").exists()


def test_the_fixture_traversal_archive_is_refused(tmp_path):
    src = ts_archives.traversal_archive(tmp_path)
    with pytest.raises(TSError, match="outside the model directory"):
        unpack(src, tmp_path / "out" / "m")
    assert not (tmp_path / "out" / "escaped.txt").exists()


def _tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        data = MANIFEST.encode()
        info = tarfile.TarInfo("m/MAR-INF/MANIFEST.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for m in members:
            tf.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


def test_tar_symlink_hardlink_and_traversal_are_refused(tmp_path):
    link = tarfile.TarInfo("m/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("m/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../../outside"
    up = tarfile.TarInfo("../up.txt")
    up.size = 1
    for i, member in enumerate([link, hard, up]):
        src = _tar(tmp_path / f"bad{i}.tar.gz", [member])
        with pytest.raises(TSError) as ei:
            unpack(src, tmp_path / f"out{i}" / "m")
        assert ei.value.type == "InvalidModelException"
    assert not (tmp_path / "up.txt").exists()


def test_not_an_archive_and_missing_manifest(tmp_path):
    junk = tmp_path / "junk.mar"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(TSError, match="neither a zip"):
        unpack(junk, tmp_path / "a")
    src = _zip(tmp_path / "nomanifest.mar", {"h.py": "x"})
    with pytest.raises(TSError, match="MANIFEST.json not found"):
        read_manifest(unpack(src, tmp_path / "b"))
    src = _zip(
        tmp_path / "nohandler.mar", {"MAR-INF/MANIFEST.json": '{"model": {"modelName": "m"}}'}
    )
    with pytest.raises(TSError, match="names no handler"):
        read_manifest(unpack(src, tmp_path / "c"))
