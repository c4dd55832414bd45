"""Triton's classification extension: an output asked for with `classification: k` comes
back as the top-k entries, each the BYTES string "score:index" or "score:index:label".

Labels come from the output's `label_filename` (one label per line, in the model folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import InvalidArgument, ModelConfigError
from modelport.repository.tensors import InferTensor


def load_labels(cfg: mc.ModelConfig, model_dir: Path) -> dict[str, list[str]]:
    labels = {}
    for out in cfg.output:
        if out.label_filename:
            path = model_dir / out.label_filename
            if not path.is_file():
                raise ModelConfigError(
                    f"model '{cfg.name}': label file {path} of output '{out.name}' not found"
                )
            labels[out.name] = path.read_text(encoding="utf-8").splitlines()
    return labels


def classify(t: InferTensor, k: int, labels: list[str] | None, batched: bool) -> InferTensor:
    if k < 1:
        raise InvalidArgument(f"classification count for output '{t.name}' must be >= 1")
    if t.datatype in ("BYTES", "BOOL"):
        raise InvalidArgument(f"output '{t.name}' of type {t.datatype} cannot be classified")
    rows = t.data.reshape(t.data.shape[0], -1) if batched else t.data.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=np.object_)
    for r, row in enumerate(rows):
        top = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for j, idx in enumerate(top):
            text = f"{float(row[idx]):f}:{int(idx)}"
            if labels is not None and idx < len(labels):
                text += f":{labels[idx]}"
            out[r, j] = text.encode()
    return InferTensor(t.name, "BYTES", out if batched else out.reshape(k))
