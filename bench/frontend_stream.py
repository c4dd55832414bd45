"""The OpenAI server's front end alone: how many streamed tokens a second it can send, and
how much host CPU time the server process spends on each, with an engine that costs nothing.

Everything in the server process is the real code (`modelport serve`: FastAPI routes, chat
template, tokenizer, AsyncLLM, the core client's pipes, reader and writer threads,
detokenizer, SSE chunks). Only the engine core process is fake: the core client starts
`fake_run_engine_core` (this file) instead of `run_engine_core`; it runs the real busy loop
(`core_client._busy_loop`) over a core that "decodes" one token a step for every running
request at no model cost (optionally sleeping --step-ms a step, as a GPU step would take).
The tokenizer is the embedded default model's (SmolLM2's byte-level BPE); its weights are
never loaded.

The load is closed-loop: C client tasks each send one streamed request (max_tokens, ignore_eos)
and the next when it ends. The client is a bare asyncio socket reader that counts SSE
events (no JSON parsing), so it costs the shared CPU little. A window of --seconds at each
concurrency reports streamed tokens/s and the server process's CPU time (user + system, all
its threads, not the core process) per token.

    PYTHONPATH=src python bench/frontend_stream.py [--concurrency 32 128 256] [--seconds 8]
        [--endpoint chat|completions] [--prompt-ids] [--max-tokens 128] [--prompt-len 1024]
        [--logprobs K] [--variants new base stdloop pydantic] [--base-src DIR] [--profile DIR]
        [--step-ms 1]

--variants runs one server per variant, one after another in the same run: `new` is this
tree's server; `base` is the same with PYTHONPATH=--base-src (another checkout's src, e.g.
`git archive HEAD src | tar -x -C /tmp/base` for the code before a change); `stdloop` sets
MODELPORT_UVLOOP=0 (the stdlib event loop) and `pydantic` MODELPORT_SSE_FASTPATH=0 (SSE
chunks built by the pydantic models), `stdloop-pydantic` both. --profile DIR writes a cProfile
of the server's event-loop thread for each variant and concurrency (DIR/<variant>-c<C>.prof)
and prints its top functions (the profiler slows the server: read its shares, not its times).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the fake engine core
# (runs in the core process the server spawns; must stay importable from __main__)

_TOKEN_BASE = 1000  # SmolLM2: ids 1000..2999 are ordinary BPE pieces (no special tokens)
_TOKEN_SPAN = 2000


class FakeCore:
    """EngineCore's interface as _busy_loop uses it; one token a step per running request."""

    num_kv_blocks = 1 << 20
    block_size = 16

    def __init__(self) -> None:
        self.reqs: dict[str, list] = {}
        self.step_s = float(os.environ.get("FRONTEND_BENCH_STEP_MS", "0")) / 1000

    def add_request(self, r) -> None:
        sp = r.sampling_params
        seed = sum(map(ord, r.request_id)) * 7
        self.reqs[r.request_id] = [0, int(sp["max_tokens"]), sp.get("logprobs"), seed, None]

    def abort_requests(self, ids):
        from modelport.engine.messages import EngineCoreOutput

        out = []
        for rid in ids:
            if self.reqs.pop(rid, None) is not None:
                out.append(EngineCoreOutput(request_id=rid, new_token_ids=[],
                                            finish_reason="abort"))
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def step(self):
        from modelport.engine.messages import EngineCoreOutput, EngineCoreOutputs, TokenLogprobs

        if self.step_s:
            time.sleep(self.step_s)
        now = time.monotonic()
        outs = []
        done = []
        for rid, st in self.reqs.items():
            n, max_tokens, k, seed, first = st
            tok = _TOKEN_BASE + (seed + 13 * n) % _TOKEN_SPAN
            lps = None
            if k is not None:
                tops = [tok] + [_TOKEN_BASE + (tok + 17 * j) % _TOKEN_SPAN for j in range(1, k)]
                lps = [TokenLogprobs(token_ids=[tok] + tops[:k],
                                     logprobs=[-0.25] + [-0.25 - j for j in range(k)][:k],
                                     ranks=[1] + list(range(1, k + 1)))]
            if first is None:
                st[4] = first = now
            n += 1
            st[0] = n
            fin = "length" if n >= max_tokens else None
            outs.append(EngineCoreOutput(request_id=rid, new_token_ids=[tok], new_logprobs=lps,
                                         finish_reason=fin, first_scheduled_time=first,
                                         first_token_time=first))
            if fin:
                done.append(rid)
        for rid in done:
            del self.reqs[rid]
        return EngineCoreOutputs(outputs=outs)

    def get_stats(self):
        from modelport.engine.messages import SchedulerStats

        return SchedulerStats(num_running=len(self.reqs), num_kv_blocks=self.num_kv_blocks,
                              block_size=self.block_size)

    def take_rejected(self):
        return []

    def shutdown(self) -> None:
        pass


def fake_run_engine_core(engine_config, in_conn, out_conn, log_level: int = 20) -> None:
    """run_engine_core's contract (ready, then the busy loop) with FakeCore."""
    from modelport.engine import core_client as cc

    cc.prepare_child_process()

    def send(msg) -> None:
        out_conn.send_bytes(cc._from_core_encoder.encode(msg))

    core = FakeCore()
    send(cc.CoreReady(num_kv_blocks=core.num_kv_blocks, block_size=core.block_size,
                      device="fake (frontend_stream.py)", load_seconds=0.0))
    try:
        cc._busy_loop(core, in_conn, send)
    except (EOFError, OSError):
        return


def server_main(port: int, serve_args: list[str]) -> int:
    """The server process: `modelport serve` with the fake core; SIGUSR1 starts a cProfile
    of the event-loop thread, SIGUSR2 writes it to $FRONTEND_BENCH_PROF."""
    import cProfile

    from modelport.engine import core_client as cc
    from modelport.entrypoints.cli import main

    cc.run_engine_core = fake_run_engine_core
    prof: list[cProfile.Profile] = []

    def start(*_):
        p = cProfile.Profile()
        prof[:] = [p]
        p.enable()

    def stop(*_):
        if prof:
            prof[0].disable()
            prof[0].dump_stats(os.environ["FRONTEND_BENCH_PROF"])
            prof.clear()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(["serve", "--port", str(port), "--log-level", "warning", "--device", "cpu",
                 *serve_args])


# ---------------------------------------------------------------- the load


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Load:
    def __init__(self, port: int, body: bytes, path: str, overhead_events: int) -> None:
        self.port = port
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.request = head + body
        self.overhead = overhead_events  # events a response has that carry no token
        self.tokens = 0
        self.done = 0
        self.errors = 0
        self.stop = False

    async def one(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(self.request)
        tail = b""
        events = 0
        first = True
        ok = None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if ok is None:
                    ok = data.startswith(b"HTTP/1.1 200")
                buf = tail + data
                n = buf.count(b"data: ")
                tail = buf[-5:]
                events += n
                if n and first:  # the role chunk (chat) carries no token
                    first = False
                    n -= self.overhead - 2
                self.tokens += n
        finally:
            writer.close()
        self.tokens -= 2  # usage chunk and [DONE]
        self.done += 1
        if not ok:
            self.errors += 1

    async def worker(self) -> None:
        while not self.stop:
            await self.one()


async def run_level(port: int, pid: int, body: bytes, path: str, overhead: int, conc: int,
                    seconds: float, warmup: float, prof_path: str | None) -> dict:
    load = Load(port, body, path, overhead)
    tasks = [asyncio.create_task(load.worker()) for _ in range(conc)]
    await asyncio.sleep(warmup)
    if prof_path:
        os.environ["FRONTEND_BENCH_PROF"] = prof_path  # (the server read it at start)
        os.kill(pid, signal.SIGUSR1)
    t0, c0, k0, d0 = time.perf_counter(), cpu_seconds(pid), load.tokens, load.done
    await asyncio.sleep(seconds)
    t1, c1, k1, d1 = time.perf_counter(), cpu_seconds(pid), load.tokens, load.done
    if prof_path:
        os.kill(pid, signal.SIGUSR2)
    load.stop = True
    await asyncio.gather(*tasks)
    toks = k1 - k0
    return {"concurrency": conc, "seconds": round(t1 - t0, 2), "requests": d1 - d0,
            "tokens": toks, "tok_per_s": round(toks / (t1 - t0)),
            "server_cpu_s": round(c1 - c0, 2),
            "server_cpu_frac": round((c1 - c0) / (t1 - t0), 2),
            "us_per_token": round(1e6 * (c1 - c0) / max(toks, 1), 1),
            "errors": load.errors}


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(args: argparse.Namespace) -> tuple[bytes, str, int]:
    # a long prompt of ordinary words (about one token each), as W2's 1,024-token prompts
    words = ("the quick brown fox jumps over a lazy dog while seven small birds sing "
             "songs about rivers and mountains").split()
    text = " ".join(words[i % len(words)] for i in range(args.prompt_len))
    common: dict = {"model": None, "max_tokens": args.max_tokens, "ignore_eos": True,
                    "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
    common.pop("model")
    if args.endpoint == "chat":
        body = {**common, "messages": [{"role": "user", "content": text}]}
        if args.logprobs is not None:
            body.update(logprobs=True, top_logprobs=args.logprobs)
        return json.dumps(body).encode(), "/v1/chat/completions", 3
    prompt: object = text
    if args.prompt_ids:
        prompt = [_TOKEN_BASE + (7 * i) % _TOKEN_SPAN for i in range(args.prompt_len)]
    body = {**common, "prompt": prompt}
    if args.logprobs is not None:
        body["logprobs"] = args.logprobs
    return json.dumps(body).encode(), "/v1/completions", 2


def print_profile(path: str, top: int) -> None:
    import pstats

    st = pstats.Stats(path)
    st.sort_stats("tottime").print_stats(top)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--server":
        return server_main(int(sys.argv[2]), sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--logprobs", type=int, default=None, help="top logprobs a token")
    ap.add_argument("--step-ms", type=float, default=1.0,
                    help="fake step time (ms; 0 spins a core of the machine)")
    ap.add_argument("--prompt-ids", action="store_true",
                    help="completions: the prompt as token ids (W2's shape: no tokenizing)")
    ap.add_argument("--variants", nargs="+", default=["new"],
                    choices=("new", "base", "stdloop", "pydantic", "stdloop-pydantic"))
    ap.add_argument("--base-src", type=Path, default=None, help="src folder of variant base")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile folder")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("serve_args", nargs="*", help="after --: more `modelport serve` arguments")
    args = ap.parse_args()
    body, path, overhead = request_body(args)
    results = []
    for variant in args.variants:
        port = free_port()
        src = args.base_src if variant == "base" else ROOT / "src"
        if src is None:
            ap.error("variant base needs --base-src")
        env = dict(os.environ, FRONTEND_BENCH_STEP_MS=str(args.step_ms),
                   PYTHONPATH=str(Path(src).resolve()))
        env["MODELPORT_UVLOOP"] = "0" if variant.startswith("stdloop") else "1"
        env["MODELPORT_SSE_FASTPATH"] = "0" if variant.endswith("pydantic") else "1"
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            env["FRONTEND_BENCH_PROF"] = str(args.profile / f"{variant}.prof")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--server", str(port),
               "--max-model-len", str(max(4096, 2 * args.prompt_len + args.max_tokens)),
               "--max-num-seqs", "1024", *args.serve_args]
        proc = subprocess.Popen(cmd, env=env)
        try:
            wait_ready(port, proc)
            for conc in args.concurrency:
                prof = None
                if args.profile:  # the server reads the path at SIGUSR2: one file a run
                    prof = str(args.profile / f"{variant}.prof")
                r = asyncio.run(run_level(port, proc.pid, body, path, overhead, conc,
                                          args.seconds, args.warmup, prof))
                if prof:
                    final = args.profile / f"{variant}-c{conc}.prof"
                    time.sleep(1.0)
                    os.replace(prof, final)
                    r["profile"] = str(final)
                r["variant"] = variant
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.profile:
        for r in results:
            print(f"\n==== {r['variant']} c={r['concurrency']} ====")
            print_profile(r["profile"], args.profile_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
