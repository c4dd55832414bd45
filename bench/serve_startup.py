"""Seconds from launching `modelport serve` to its first 200 on /health (the engine loaded),
over a few runs, for the embedded default unless flags say otherwise.

    python bench/serve_startup.py --runs 3 [-- extra serve flags]

Prints one JSON object: the command, the machine (CPU count, torch) and each run's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(flags: list[str], log: str) -> float:
    port = _port()
    cmd = [sys.executable, "-m", "modelport.entrypoints.cli", "serve", *flags,
           "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited ({proc.returncode}); see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("flags", nargs="*", help="serve flags (after --)")
    args = ap.parse_args()
    flags = args.flags or ["--max-model-len", "512"]
    log = os.path.join(tempfile.mkdtemp(prefix="startup-"), "serve.log")
    seconds = [round(one_start(flags, log), 3) for _ in range(args.runs)]
    import torch

    print(json.dumps({"bench": "serve_startup", "flags": flags, "seconds": seconds,
                      "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                      "torch": torch.__version__,
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}))


if __name__ == "__main__":
    main()
