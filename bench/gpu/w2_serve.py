"""W2 of shared/BENCH.md: online serving through the OpenAI-compatible HTTP server.

1,000 requests of 1,024 prompt tokens and 128 output tokens (ignore_eos, greedy, streamed),
all at once (rate inf) and at Poisson 16 req/s, against `modelport serve` running the model
config given (the Llama-3.1-8B shape by default) with dummy weights. `modelport bench serve`
measures throughput and mean / median / p99 TTFT, TPOT, ITL as a client sees them.

The GPU machine has no hub, so there is no Llama-3 tokenizer: a synthetic word-level one with
one entry per id of the model's vocabulary ("<t0>", "<t1>", ...) is written beside the
config. Prompts are token ids, so it only detokenizes the outputs (one word a token: about
the cost of a real tokenizer's incremental decode).

    python3 bench/gpu/w2_serve.py --out DIR [--model-config CFG] [--rates inf 16]
        [--num-prompts 1000] [--port 8011] [-- extra `modelport serve` arguments]

One JSON object a rate goes to DIR/w2-serve.jsonl (the bench's result, plus device, torch
version, the server's command line); the server's log to DIR/w2-server.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def model_folder(config: Path) -> Path:
    """config.json + a synthetic tokenizer with the config's vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads(config.read_text())
    n = int(cfg["vocab_size"])
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    folder = Path(tempfile.mkdtemp(prefix="w2-model-"))
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(n)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>",
                                   eos_token=f"<t{eos if eos is not None else n - 1}>")
    fast.save_pretrained(str(folder))
    return folder


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


def device_info() -> dict[str, str]:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": dev, "torch": torch.__version__, "host_cpus": str(os.cpu_count())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model-config", type=Path, default=ROOT / "bench/configs/llama-3.1-8b.json")
    ap.add_argument("--rates", nargs="+", default=["inf", "16"])
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("serve_args", nargs="*", help="after --: more `modelport serve` arguments")
    args = ap.parse_args()
    # the HTTP stack travels as wheels to the GPU machine: name what is missing before the
    # server (and the 8B model's start-up) is paid for
    probe = subprocess.run([sys.executable, "-c", "import modelport.entrypoints.openai.frontend"],
                           capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"the OpenAI frontend does not import here ({last}); carry the missing "
                         "package as a wheel (bench/gpu/run_all.sh's header lists them)")
    from modelport.bench import serve as serve_bench

    args.out.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.model_config)
    vocab = int(json.loads(args.model_config.read_text())["vocab_size"])
    url = f"http://127.0.0.1:{args.port}"
    server_cmd = [sys.executable, "-m", "modelport", "serve", "--model", str(folder),
                  "--load-format", "dummy", "--max-model-len",
                  str(args.input_len + args.output_len + 64), "--port", str(args.port),
                  *args.serve_args]
    log = open(args.out / "w2-server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT)
    rc = 0
    try:
        t0 = time.perf_counter()
        wait_ready(url, server, args.ready_timeout)
        print(f"server ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for rate in args.rates:
            p = argparse.ArgumentParser()
            serve_bench.add_args(p)
            bench_args = p.parse_args([
                "--url", url, "--num-prompts", str(args.num_prompts),
                "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                "--request-rate", rate, "--token-range", str(min(1000, vocab // 4)),
                str(min(vocab, 100000)),
                "--timeout", "1800", "--save-detailed", "--ignore-eos"])
            result = asyncio.run(serve_bench.run_async(bench_args))
            # per request: send time, TTFT, lengths, error (where the TTFT tail sits); the
            # ITL lists and texts (~4 MB a run) stay out, their summary is above
            result.pop("itls", None)
            result.pop("generated_texts", None)
            result.update(device_info())
            result["workload"] = "W2"
            result["server_command"] = " ".join(server_cmd[1:])
            result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
            line = json.dumps(result)
            print(line, flush=True)
            with open(args.out / "w2-serve.jsonl", "a") as f:
                f.write(line + "\n")
            if result["completed"] != result["num_prompts"]:
                rc = 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
