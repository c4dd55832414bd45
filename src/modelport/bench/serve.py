"""Online serving benchmark against a running OpenAI-compatible server (`vllm bench serve`'s
flags and result keys, so a script written for it runs with `modelport bench serve`).

Datasets: ``random`` (default): prompts of --random-input-len token ids (+- --random-range-ratio,
after a shared --random-prefix-len prefix), --random-output-len tokens each; sent as token-id
prompts to /v1/completions, so the length is exact whatever the tokenizer, and as the text
they decode to (the server's /detokenize, or --tokenizer) to /v1/chat/completions.
``sharegpt``: the first two turns of each conversation in --dataset-path (vLLM's ShareGPT JSON),
the first as the prompt, the second's token count as the output length (--sharegpt-output-len
overrides it), conversations too short or too long skipped as vLLM does.

Arrivals: Poisson at --request-rate (gamma with --burstiness), inf: all at once; at most
--max-concurrency in flight. Every request streams, so TTFT, TPOT and ITL are what a client
sees. Before the timed run, --num-warmups requests of the workload's shape (default 1) go to
the server and are not counted (vLLM's initial test run): the first request's one-off costs
stay out of the figures, and a server that rejects the workload is reported at once.

Prints one JSON object (mean / median / std and --metric-percentiles of each of
--percentile-metrics, in ms; request_goodput with --goodput); --save-result also writes it to
--result-dir / --result-filename, --save-detailed adds each request's lengths, TTFT, ITLs,
generated text, error and send time. --profile runs the server's torch profiler over the
timed run (the server started with VLLM_TORCH_PROFILER_DIR; engine/torch_profiler.py).
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
from datetime import datetime
from pathlib import Path
from typing import Any

from modelport.argtypes import parse_json_dict

METRICS = ("ttft", "tpot", "itl", "e2el")
BACKENDS = {"openai": "/v1/completions", "vllm": "/v1/completions",
            "openai-chat": "/v1/chat/completions"}


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_args(p: argparse.ArgumentParser) -> None:
    srv = p.add_argument_group("server")
    srv.add_argument("--base-url", "--url", dest="url", default=None,
                     help="server base URL (default: http://HOST:PORT)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--backend", default="openai", choices=sorted(BACKENDS),
                     help="openai / vllm: /v1/completions; openai-chat: /v1/chat/completions")
    srv.add_argument("--endpoint", default=None, help="API path (default: the backend's)")
    srv.add_argument("--model", default=None, help="model name (default: the server's first)")
    srv.add_argument("--tokenizer", default=None,
                     help="a local tokenizer folder for text prompts and ShareGPT lengths "
                          "(default: the server's /tokenize and /detokenize)")
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--header", action="append", type=_key_value, default=[],
                     metavar="KEY=VALUE", help="an extra HTTP header (repeatable)")
    srv.add_argument("--ready-check-timeout-sec", type=float, default=600.0,
                     help="wait this long for the server's /health before starting (0: no wait)")
    srv.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    srv.add_argument("--request-id-prefix", default="bench-",
                     help="requests carry X-Request-Id PREFIX<i>")

    data = p.add_argument_group("workload")
    data.add_argument("--dataset-name", default="random", choices=["random", "sharegpt"])
    data.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--random-input-len", "--input-len", dest="input_len", type=int,
                      default=1024, help="prompt tokens per request")
    data.add_argument("--random-output-len", "--output-len", dest="output_len", type=int,
                      default=128, help="generated tokens per request")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    data.add_argument("--random-prefix-len", type=int, default=0,
                      help="random tokens every prompt starts with (before its own)")
    data.add_argument("--sharegpt-output-len", type=int, default=None)
    data.add_argument("--token-range", type=int, nargs=2, default=(1000, 10000),
                      metavar=("LO", "HI"),
                      help="random prompt ids are drawn from [LO, HI) (away from special tokens)")
    data.add_argument("--seed", type=int, default=0)

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="requests/s (Poisson); inf: all at once")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the gaps (1: Poisson; < 1 burstier, > 1 steadier)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="cap on requests in flight")
    load.add_argument("--num-warmups", type=int, default=1,
                      help="uncounted requests of the workload's shape sent (together) first")

    samp = p.add_argument_group("sampling")
    samp.add_argument("--ignore-eos", action="store_true",
                      help="generate exactly the output length (ignore_eos on every request)")
    samp.add_argument("--temperature", type=float, default=0.0, help="default: greedy")
    samp.add_argument("--top-p", type=float, default=None)
    samp.add_argument("--top-k", type=int, default=None)
    samp.add_argument("--min-p", type=float, default=None)
    samp.add_argument("--extra-body", type=parse_json_dict, default=None,
                      help="a JSON object merged into every request's body")

    out = p.add_argument_group("result")
    out.add_argument("--percentile-metrics", default=",".join(METRICS),
                     help=f"comma-separated, of {', '.join(METRICS)}")
    out.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    out.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                     help="SLOs (ttft / tpot / e2el in ms) a request must all meet to count "
                          "in request_goodput")
    out.add_argument("--label", default=None, help="the result's label (default: the backend)")
    out.add_argument("--metadata", nargs="+", type=_key_value, default=[], metavar="KEY=VALUE",
                     help="recorded in the result")
    out.add_argument("--save-result", action="store_true",
                     help="also write the result to --result-dir / --result-filename")
    out.add_argument("--save-detailed", action="store_true",
                     help="add each request's lengths, TTFT, ITLs, text, error and send time")
    out.add_argument("--result-dir", default=".")
    out.add_argument("--result-filename", default=None)
    out.add_argument("--output-json", default=None, help="also write the result here")
    out.add_argument("--disable-tqdm", action="store_true",
                     help="accepted for vllm bench serve's scripts (modelport draws no bar)")
    out.add_argument("--profile", action="store_true",
                     help="run the server's torch profiler over the timed run (POST "
                          "/start_profile after the warm-ups, /stop_profile at the end); the "
                          "server must start with VLLM_TORCH_PROFILER_DIR (or "
                          "MODELPORT_TORCH_PROFILER_DIR) set, its traces go there")


@dataclass
class Prompt:
    ids: list[int] | None  # token ids (random dataset)
    text: str | None
    output_len: int


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
    text: str = ""


class BenchError(RuntimeError):
    """The benchmark cannot run (bad arguments, server not ready, a failed warm-up)."""


def random_prompts(n: int, length: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def _lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    if ratio == 0:
        return [length] * n
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_dataset(args: argparse.Namespace, n: int, seed: int) -> list[Prompt]:
    """n prompts of the random dataset: ids drawn from --token-range after a shared prefix."""
    if args.random_range_ratio == 0 and args.random_prefix_len == 0:  # the original stream
        return [Prompt(ids, None, args.output_len)
                for ids in random_prompts(n, args.input_len, *args.token_range, seed)]
    rng = random.Random(seed)
    lo, hi = args.token_range
    prefix = [rng.randrange(lo, hi) for _ in range(args.random_prefix_len)]
    ins = _lengths(rng, n, args.input_len, args.random_range_ratio)
    outs = _lengths(rng, n, args.output_len, args.random_range_ratio)
    return [Prompt(prefix + [rng.randrange(lo, hi) for _ in range(k)], None, o)
            for k, o in zip(ins, outs, strict=True)]


def sharegpt_conversations(path: str) -> list[tuple[str, str]]:
    """(prompt, completion) of every conversation with two turns or more, in file order."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"--dataset-path {path}: {e}") from None
    if not isinstance(data, list):
        raise BenchError(f"--dataset-path {path}: expected a JSON list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(
                isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


class Tokens:
    """Token counting and decoding through --tokenizer or the server's endpoints."""

    def __init__(self, tokenizer: str | None, client: Any, base: str, model: str) -> None:
        self._tok = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(tokenizer)
        self._client, self._base, self._model = client, base, model

    async def count(self, text: str) -> int:
        if self._tok is not None:
            return len(self._tok(text, add_special_tokens=False)["input_ids"])
        r = await self._client.post(f"{self._base}/tokenize", json={
            "model": self._model, "prompt": text, "add_special_tokens": False})
        if r.status_code != 200:
            raise BenchError(f"the server's /tokenize answered {r.status_code}: {r.text[:200]} "
                             "(give --tokenizer)")
        return int(r.json()["count"])

    async def decode(self, ids: list[int]) -> str:
        if self._tok is not None:
            return self._tok.decode(ids)
        r = await self._client.post(f"{self._base}/detokenize",
                                    json={"model": self._model, "tokens": ids})
        if r.status_code != 200:
            raise BenchError(f"the server's /detokenize answered {r.status_code}: "
                             f"{r.text[:200]} (give --tokenizer)")
        return r.json()["prompt"]


async def sharegpt_dataset(args: argparse.Namespace, tokens: Tokens, n: int,
                           seed: int) -> list[Prompt]:
    """vLLM's ShareGPT sampling: shuffled; a prompt or completion under 4 tokens, a prompt
    over 1,024 or a pair over 2,048 is skipped (not with --sharegpt-output-len)."""
    if not args.dataset_path:
        raise BenchError("--dataset-name sharegpt needs --dataset-path (vLLM's ShareGPT JSON)")
    pairs = sharegpt_conversations(args.dataset_path)
    random.Random(seed).shuffle(pairs)
    out: list[Prompt] = []
    for prompt, completion in pairs:
        if len(out) == n:
            break
        p_len = await tokens.count(prompt)
        o_len = args.sharegpt_output_len or await tokens.count(completion)
        if args.sharegpt_output_len is None and (
                p_len < 4 or o_len < 4 or p_len > 1024 or p_len + o_len > 2048):
            continue
        out.append(Prompt(None, prompt, o_len))
    if not out:
        raise BenchError(f"--dataset-path {args.dataset_path}: no conversation fits")
    base = len(out)
    while len(out) < n:  # oversample, as vLLM does: the kept conversations again, in order
        out.append(out[len(out) % base])
    return out


def _body(args: argparse.Namespace, model: str, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": args.temperature}
    if args.backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
        body["max_completion_tokens"] = prompt.output_len
    else:
        body["prompt"] = prompt.ids if prompt.ids is not None else prompt.text
        body["max_tokens"] = prompt.output_len
    if args.ignore_eos:
        body["ignore_eos"] = True
    for key in ("top_p", "top_k", "min_p"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    body.update(args.extra_body or {})
    return body


def _new_text(chunk: dict[str, Any]) -> str | None:
    """The text a streamed chunk adds (None: a chunk without new tokens, e.g. the role or the
    usage)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    c = choices[0]
    if "delta" in c:
        d = c["delta"] or {}
        text = (d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
        return text or None
    text = c.get("text")
    return text if text else None


async def _one(client: Any, url: str, body: dict, timeout: float,
               headers: dict[str, str] | None = None) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, timeout=timeout,
                                 headers=headers) as r:
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
                text = _new_text(chunk)
                if text is not None:
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.text += text
        res.latency = time.perf_counter() - start
        res.ok = True
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _model_name(client: Any, base: str, given: str | None) -> str:
    if given:
        return given
    r = await client.get(f"{base}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _wait_ready(client: Any, base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await client.get(f"{base}/health", timeout=5)).status_code == 200:
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() >= deadline:
            raise BenchError(f"the server at {base} was not ready within {timeout:g} s")
        await asyncio.sleep(1.0)


def _gaps(args: argparse.Namespace, n: int) -> list[float]:
    """Seconds before each next request: exponential (Poisson arrivals) at burstiness 1, else
    gamma of shape burstiness with the same mean."""
    if args.request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(args.seed + 1)
    if args.burstiness == 1.0:
        return [rng.expovariate(args.request_rate) for _ in range(n)]
    scale = 1.0 / (args.request_rate * args.burstiness)
    return [rng.gammavariate(args.burstiness, scale) for _ in range(n)]


def check_args(args: argparse.Namespace) -> None:
    if args.num_warmups < 0:
        raise BenchError("--num-warmups must be >= 0")
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be >= 1")
    if args.burstiness <= 0:
        raise BenchError("--burstiness must be > 0")
    if not 0 <= args.random_range_ratio < 1:
        raise BenchError("--random-range-ratio must be in [0, 1)")
    if args.input_len < 1 or args.output_len < 1 or args.random_prefix_len < 0:
        raise BenchError("--random-input-len and --random-output-len must be >= 1")
    bad = [m for m in _metrics(args) if m not in METRICS]
    if bad:
        raise BenchError(f"--percentile-metrics: unknown {', '.join(bad)} (of {', '.join(METRICS)})")
    _percentiles(args)
    _slos(args)


def _metrics(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]


def _percentiles(args: argparse.Namespace) -> list[float]:
    try:
        ps = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        raise BenchError(f"--metric-percentiles: not numbers: {args.metric_percentiles!r}") from None
    if any(not 0 < p <= 100 for p in ps):
        raise BenchError("--metric-percentiles must lie in (0, 100]")
    return ps


def _slos(args: argparse.Namespace) -> dict[str, float]:
    slos = {}
    for item in args.goodput or []:
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise BenchError(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        try:
            slos[name] = float(value)
        except ValueError:
            raise BenchError(f"--goodput {item!r}: {value!r} is not a number") from None
    return slos


async def _profile(client: Any, base: str, action: str) -> None:
    """POST /start_profile or /stop_profile; BenchError with the reason when refused."""
    try:
        r = await client.post(f"{base}/{action}_profile", timeout=None)
    except Exception as e:
        raise BenchError(f"--profile: POST /{action}_profile failed: {e}") from None
    if r.status_code == 404:
        raise BenchError("--profile: the server has no /start_profile: start it with "
                         "VLLM_TORCH_PROFILER_DIR (or MODELPORT_TORCH_PROFILER_DIR) set")
    if r.status_code != 200:
        raise BenchError(f"--profile: POST /{action}_profile: HTTP {r.status_code}: {r.text}")


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    check_args(args)
    base = (args.url or f"http://{args.host}:{args.port}").rstrip("/")
    url = base + (args.endpoint or BACKENDS[args.backend])
    headers = dict(args.header)
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as client:
        if args.ready_check_timeout_sec > 0:
            await _wait_ready(client, base, args.ready_check_timeout_sec)
        model = await _model_name(client, base, args.model)
        tokens = None
        if args.tokenizer or args.dataset_name == "sharegpt" or args.backend == "openai-chat":
            tokens = Tokens(args.tokenizer, client, base, model)
        # warm-up prompts come from another seed: the timed ones stay cold for prefix caching
        if args.dataset_name == "sharegpt":
            assert tokens is not None
            both = await sharegpt_dataset(args, tokens, args.num_warmups + args.num_prompts,
                                          args.seed)
            warm, prompts = both[: args.num_warmups], both[args.num_warmups:]
        else:
            warm = random_dataset(args, args.num_warmups, args.seed - 1)
            prompts = random_dataset(args, args.num_prompts, args.seed)
        if args.backend == "openai-chat" and args.dataset_name == "random":
            assert tokens is not None
            for p in warm + prompts:
                p.text, p.ids = await tokens.decode(p.ids or []), None
        done = await asyncio.gather(
            *(_one(client, url, _body(args, model, p), args.timeout) for p in warm))
        failed = [r.error for r in done if not r.ok]
        if failed:
            raise BenchError(f"{len(failed)} of {len(warm)} warm-up requests failed: {failed[0]}")
        if args.profile:  # the timed run only (vLLM's: after its initial test run)
            await _profile(client, base, "start")
        sem = asyncio.Semaphore(args.max_concurrency or len(prompts) or 1)

        async def limited(i: int, body: dict, sent: float) -> RequestResult:
            async with sem:
                res = await _one(client, url, body, args.timeout,
                                 {"X-Request-Id": f"{args.request_id_prefix}{i}"})
            res.sent = sent
            return res

        tasks = []
        gaps = _gaps(args, len(prompts))
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            sent = time.perf_counter() - start
            tasks.append(asyncio.create_task(limited(i, _body(args, model, p), sent)))
            if gaps[i]:
                await asyncio.sleep(gaps[i])
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if args.profile:
            await _profile(client, base, "stop")
    return report(args, model, results, duration)


def _summary(values: list[float], name: str, percentiles: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values] or [0.0]
    out = {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
           f"std_{name}_ms": statistics.pstdev(ms)}
    s = sorted(ms)
    for p in percentiles:
        # linear interpolation between the closest ranks (numpy's default)
        pos = (len(s) - 1) * p / 100
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        word = str(int(p)) if p == int(p) else str(p)
        out[f"p{word}_{name}_ms"] = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return out


def _tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 and r.ttft else 0.0


def report(args: argparse.Namespace, model: str, results: list[RequestResult],
           duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    rate = args.request_rate if args.request_rate != float("inf") else "inf"
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "label": args.label or args.backend,
        "model_id": model,
        "tokenizer_id": args.tokenizer or model,
        "model": model,
        "dataset_name": args.dataset_name,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "request_rate": rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_warmups": args.num_warmups,
        "duration": duration,
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
    }
    slos = _slos(args)
    if slos:
        good = sum(1 for r in ok if r.ttft * 1e3 <= slos.get("ttft", float("inf"))
                   and _tpot(r) * 1e3 <= slos.get("tpot", float("inf"))
                   and r.latency * 1e3 <= slos.get("e2el", float("inf")))
        result["request_goodput"] = good / duration if duration else 0.0
        result["goodput_slos_ms"] = slos
    values = {"ttft": [r.ttft for r in ok if r.ttft],
              "tpot": [_tpot(r) for r in ok if r.output_tokens > 1 and r.ttft],
              "itl": [x for r in ok for x in r.itl],
              "e2el": [r.latency for r in ok]}
    percentiles = _percentiles(args)
    for name in _metrics(args):
        result.update(_summary(values[name], name, percentiles))
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        result["errors_seen"] = errors[:5]
    result.update(dict(args.metadata))
    if args.save_detailed:  # in the order the requests were sent; failed ones too
        result.update({
            "input_lens": [r.prompt_tokens for r in results],
            "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results],
            "itls": [r.itl for r in results],
            "generated_texts": [r.text for r in results],
            "errors": [r.error for r in results],
            "start_times": [round(r.sent, 6) for r in results],
        })
    return result


def result_path(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    if args.result_filename:
        name = args.result_filename
    else:
        conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        rate = result["request_rate"]
        name = (f"{result['label']}-{rate}qps{conc}-{Path(str(result['model_id'])).name}-"
                f"{result['date']}.json")
    return Path(args.result_dir) / name


def run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(run_async(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    paths = [Path(args.output_json)] if args.output_json else []
    if args.save_result:
        paths.append(result_path(args, result))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return 0 if result["completed"] == result["num_prompts"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m modelport.bench.serve ...`: the same as `modelport bench serve ...`."""
    parser = argparse.ArgumentParser(prog="python -m modelport.bench.serve", description=__doc__)
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
