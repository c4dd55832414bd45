"""Online serving benchmark against a running OpenAI-compatible server (like `vllm bench serve`).

Random prompts of exactly --input-len token ids (sent as token-id prompts, so the length is
exact whatever the tokenizer), --output-len tokens each with ignore_eos, Poisson arrivals at
--request-rate (inf: all at once), at most --max-concurrency in flight. Every request
streams, so TTFT, TPOT and ITL are what a client sees. Prints one JSON object.

Before the timed run, --num-warmups requests of the same shape (default 1) go to the server
and are not counted, as vLLM's initial test run: the first request's one-off costs (kernel
compilation for new shapes, allocator growth) stay out of the figures, and a server that
rejects the workload is reported at once instead of 1,000 times. --save-detailed adds each
request's send time, TTFT, latency and output length to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: burst"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--token-range",
        type=int,
        nargs=2,
        default=(1000, 10000),
        metavar=("LO", "HI"),
        help="random prompt ids are drawn from [LO, HI) (away from special tokens)",
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--output-json", default=None, help="also write the result here")
    p.add_argument(
        "--num-warmups",
        type=int,
        default=1,
        help="uncounted requests of the workload's shape sent (together) before the timed run",
    )
    p.add_argument(
        "--save-detailed",
        action="store_true",
        help="add per-request send offsets, TTFTs, latencies and output lengths to the JSON",
    )


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    sent: float = 0.0  # seconds after the timed run's start
    itl: list[float] = field(default_factory=list)


def random_prompts(n: int, length: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


async def _one(client: Any, url: str, body: dict, timeout: float) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):  # a chunk with choices carries new tokens
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = True
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


def _summary(values: list[float], name: str) -> dict[str, float]:
    if not values:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        f"mean_{name}_ms": 1000 * statistics.fmean(values),
        f"median_{name}_ms": 1000 * statistics.median(values),
        f"p99_{name}_ms": 1000 * p99,
    }


async def _model_name(client: Any, base: str, given: str | None) -> str:
    if given:
        return given
    r = await client.get(f"{base}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


class WarmupFailed(RuntimeError):
    """A warm-up request failed: the timed run would fail the same way."""


def _body(model: str, ids: list[int], output_len: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": ids,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    base = args.url.rstrip("/")
    url = f"{base}/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = random_prompts(args.num_prompts, args.input_len, *args.token_range, args.seed)
    rng = random.Random(args.seed + 1)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as client:
        model = await _model_name(client, base, args.model)
        # warm-up prompts come from another seed: the timed prompts stay cold for prefix caching
        warm = random_prompts(args.num_warmups, args.input_len, *args.token_range, args.seed - 1)
        done = await asyncio.gather(
            *(_one(client, url, _body(model, ids, args.output_len), args.timeout) for ids in warm)
        )
        failed = [r.error for r in done if not r.ok]
        if failed:
            raise WarmupFailed(f"{len(failed)} of {len(warm)} warm-up requests failed: {failed[0]}")
        sem = asyncio.Semaphore(args.max_concurrency or len(prompts) or 1)

        async def limited(body: dict, sent: float) -> RequestResult:
            async with sem:
                res = await _one(client, url, body, args.timeout)
            res.sent = sent
            return res

        tasks = []
        start = time.perf_counter()
        for ids in prompts:
            body = _body(model, ids, args.output_len)
            tasks.append(asyncio.create_task(limited(body, time.perf_counter() - start)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return report(args, model, results, duration)


def report(
    args: argparse.Namespace, model: str, results: list[RequestResult], duration: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [
        (r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.ttft
    ]
    result: dict[str, Any] = {
        "model": model,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "max_concurrency": args.max_concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_warmups": args.num_warmups,
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
    }
    result.update(_summary([r.ttft for r in ok if r.ttft], "ttft"))
    result.update(_summary(tpot, "tpot"))
    result.update(_summary([x for r in ok for x in r.itl], "itl"))
    result.update(_summary([r.latency for r in ok], "e2el"))
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        result["errors"] = errors[:5]
    if args.save_detailed:  # in the order the requests were sent; failed ones too (ok: false)
        result["requests"] = {
            "ok": [r.ok for r in results],
            "sent_s": [round(r.sent, 6) for r in results],
            "ttft_ms": [round(r.ttft * 1e3, 3) for r in results],
            "latency_ms": [round(r.latency * 1e3, 3) for r in results],
            "output_tokens": [r.output_tokens for r in results],
        }
    return result


def run(args: argparse.Namespace) -> int:
    if args.num_warmups < 0:
        print("error: --num-warmups must be >= 0", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_async(args))
    except WarmupFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(text + "\n")
    return 0 if result["completed"] == result["num_prompts"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m modelport.bench.serve ...`: the same as `modelport bench serve ...`."""
    parser = argparse.ArgumentParser(prog="python -m modelport.bench.serve", description=__doc__)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
