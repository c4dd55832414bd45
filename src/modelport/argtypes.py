"""argparse types shared by the CLIs, free of torch (the HTTP benchmark client imports them)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def parse_json_dict(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
