"""Calibration text: loading (.txt / .jsonl / .json), sampling into token windows, and the warnings.

The known failure of AWQ/GPTQ is calibrating on too little text, or on text unlike what the
model will serve (the quantized model then fits the wrong activations). So the tool warns when
the set is small, and, when the user names a sample of their real traffic, when the two
token distributions differ a lot (Jensen-Shannon divergence of unigram frequencies).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

MIN_SAMPLES = 32  # fewer windows than this and per-channel statistics get noisy
MIN_TOKENS = 8192  # AutoAWQ's default is 128 x 512 = 65k tokens
JS_WARN = 0.35  # bits; same-language prose sits well under it, code vs prose well over


def read_texts(path: Path, what: str = "calibration file") -> list[str]:
    """.jsonl: the "text" field of each line; .json: an array of strings or of objects with
    a "text" field (a dataset exported as one JSON document); anything else: the file as
    UTF-8 text (a byte order mark is dropped). ``what`` names the file in errors (the
    --reference-text sample is read here too)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e})") from None
    except OSError as e:  # a folder, no permission, ...
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'{path}:{i}: each line needs a string "text" field')
            texts.append(obj["text"])
    elif path.suffix == ".json":
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        items = doc if isinstance(doc, list) else None
        if items is None or not all(
            isinstance(x, str) or (isinstance(x, dict) and isinstance(x.get("text"), str))
            for x in items
        ):
            raise ValueError(
                f'{path}: a .json {what} must be an array of strings or of objects with a '
                'string "text" field (or use .jsonl, one {"text": ...} a line, or .txt)'
            )
        texts = [x if isinstance(x, str) else x["text"] for x in items]
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{what} {path} holds no text")
    return texts


def make_windows(token_lists: Sequence[Sequence[int]], num_samples: int, seq_len: int) -> list[list[int]]:
    """Cut the concatenated token stream into up to num_samples windows of seq_len tokens."""
    stream = [t for ids in token_lists for t in ids]
    if len(stream) < 2:
        raise ValueError("calibration text tokenizes to fewer than 2 tokens")
    if len(stream) < seq_len:
        return [stream]
    n = min(num_samples, len(stream) // seq_len)
    stride = max(seq_len, (len(stream) - seq_len) // max(1, n - 1)) if n > 1 else seq_len
    return [stream[i * stride : i * stride + seq_len] for i in range(n)]


def js_divergence(a: Sequence[int], b: Sequence[int]) -> float:
    """Jensen-Shannon divergence (bits, 0..1) between the unigram distributions of a and b."""
    ca, cb = Counter(a), Counter(b)
    na, nb = sum(ca.values()), sum(cb.values())
    total = 0.0
    for tok in set(ca) | set(cb):
        p, q = ca[tok] / na, cb[tok] / nb
        m = (p + q) / 2
        if p:
            total += 0.5 * p * math.log2(p / m)
        if q:
            total += 0.5 * q * math.log2(q / m)
    return total


def calibration_warnings(windows: list[list[int]], num_samples: int, seq_len: int,
                         reference: Sequence[int] | None = None) -> list[str]:
    """Human-readable warnings about the calibration set (also logged)."""
    warnings = []
    n_tokens = sum(len(w) for w in windows)
    if len(windows) < min(num_samples, MIN_SAMPLES) or n_tokens < MIN_TOKENS:
        warnings.append(
            f"small calibration set: {len(windows)} windows / {n_tokens} tokens (asked for "
            f"{num_samples} x {seq_len}); quantization quality may suffer, give more text"
        )
    if reference is not None:
        js = js_divergence([t for w in windows for t in w], reference)
        if js > JS_WARN:
            warnings.append(
                f"calibration text looks unrelated to the reference sample (token "
                f"Jensen-Shannon divergence {js:.2f} bits > {JS_WARN}); calibrate on text like "
                "the traffic the model will serve"
            )
    for w in warnings:
        logger.warning(w)
    return warnings
