"""vLLM's `run-batch`: an OpenAI Batch API file through the OpenAI server, with no port.

    modelport run-batch -i requests.jsonl -o results.jsonl --model PATH [serve's flags]
    python -m modelport.entrypoints.openai.run_batch -i ... -o ... --model PATH

Each input line is {"custom_id", "method", "url", "body"}; the body goes, as a POST to `url`,
to the same app `python -m modelport.entrypoints.openai.api_server` serves (so validation,
defaults and responses are the server's), in process through httpx's ASGI transport. Up to
2 x max_num_seqs lines are in flight at once, so the engine batches them continuously. Each
input line (blank lines aside) gets one output line, in input order, in vLLM's shape:

    {"id": "vllm-<hex>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": "vllm-batch-<hex>", "body": {...}}}

A request the endpoint refuses has its status code in "response" (body null) and the
endpoint's {"error": {...}} as "error"; a line refused before it reaches an endpoint (an
unsupported url, "stream": true, a line that is not a request) has status 400 and a message
string as "error", as vLLM's make_error_request_output. vLLM stops at a line that is not a
request; here it gets its error line (custom_id null where there is none) and the rest run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

logger = logging.getLogger("modelport.run_batch")

PROG = "modelport run-batch"

# url -> what the served model must do for it (vLLM's run_batch routes these)
_EXACT_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_SUFFIX_URLS = ("/score", "/rerank")  # vLLM: any url ending so (/v1/score, /v2/rerank, ...)
SUPPORTED = "/v1/chat/completions, /v1/completions, /v1/embeddings, /score, /rerank"

_BAR_FORMAT = ("{desc}: {percentage:3.0f}% Completed | {n_fmt}/{total_fmt} "
               "[{elapsed}<{remaining}, {rate_fmt}]\n")


class BatchError(Exception):
    """A failure of the whole run (input, output, model): exit status 1 with its message."""


# -- arguments ---------------------------------------------------------------------------
def add_batch_args(parser: argparse.ArgumentParser) -> None:
    from modelport.entrypoints.cli_serve import add_common_args
    from modelport.entrypoints.openai.api_server import add_openai_args

    g = parser.add_argument_group("run-batch")
    g.add_argument("-i", "--input-file", required=True,
                   help="the batch input (OpenAI Batch API JSONL): a local path, - for stdin, "
                   "or an http(s) URL read with GET")
    g.add_argument("-o", "--output-file", required=True,
                   help="where the results go (JSONL, one line per request, in input order): "
                   "a local path, - for stdout, or an http(s) URL written with PUT")
    g.add_argument("--output-tmp-dir", default=None,
                   help="with an http(s) --output-file: the folder of the local file the "
                   "results are written to before the upload (default: the system's)")
    g.add_argument("--enable-metrics", action="store_true", default=False,
                   help="vLLM's Prometheus server for a batch run: not served here (refused)")
    g.add_argument("--url", default="0.0.0.0",
                   help="vLLM's metrics address for --enable-metrics (unused)")
    # the serve flags: --port/--host are accepted (vLLM's run-batch has --port) and unused
    add_common_args(parser)
    add_openai_args(parser)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run-batch",
        help="run an OpenAI Batch API file (JSONL) through the OpenAI server, as vLLM's run-batch",
        description="Run the requests of an OpenAI Batch API file through the OpenAI server's "
        "endpoints (in this process, no port) and write one result line per request.",
    )
    add_batch_args(p)
    p.set_defaults(func=run_batch_command)


def make_parser() -> argparse.ArgumentParser:
    from modelport.entrypoints.vllm_compat import ConfigFileParser

    parser = ConfigFileParser(prog="python -m modelport.entrypoints.openai.run_batch",
                              description="OpenAI-compatible batch runner (vLLM's run-batch)")
    add_batch_args(parser)
    return parser


# -- output lines ------------------------------------------------------------------------
def _uid() -> str:
    return uuid.uuid4().hex


def success_output(custom_id: Any, status: int, body: Any) -> dict[str, Any]:
    return _output(custom_id, status, body, None)


def error_output(custom_id: Any, error: Any, status: int = 400) -> dict[str, Any]:
    """vLLM's shape for a failed request: the status in "response" (no body), the error
    (the endpoint's {"error": {...}}, or a message) as "error"."""
    return _output(custom_id, status, None, error)


def _output(custom_id: Any, status: int, body: Any, error: Any) -> dict[str, Any]:
    return {"id": f"vllm-{_uid()}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"vllm-batch-{_uid()}",
                         "body": body},
            "error": error}


def parse_line(line: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(request, None) for a request line, else (None, its error output)."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, error_output(None, f"the line is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return None, error_output(None, "the line is not a JSON object with custom_id, method, "
                                        "url and body")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str):
        return None, error_output(custom_id, "custom_id: a string is required")
    for key in ("method", "url"):
        if not isinstance(obj.get(key), str):
            return None, error_output(custom_id, f"{key}: a string is required")
    if not isinstance(obj.get("body"), dict):
        return None, error_output(custom_id, "body: a JSON object is required")
    url = obj["url"]
    if url not in _EXACT_URLS and not url.endswith(_SUFFIX_URLS):
        return None, error_output(custom_id, f"URL {url} was used. Supported endpoints: "
                                             f"{SUPPORTED}.")
    if obj["body"].get("stream"):
        return None, error_output(custom_id, "Request must not be sent in stream mode")
    return obj, None


# -- input and output files --------------------------------------------------------------
def _is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def open_input(name: str) -> Iterator[str]:
    """The input's lines; opened (and for a URL, fetched) now, so a missing or unreadable
    input fails before the model loads."""
    if name == "-":
        return iter(sys.stdin)
    if _is_url(name):
        import httpx

        try:
            r = httpx.get(name, follow_redirects=True, timeout=300)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise BatchError(f"cannot read the input {name}: {e}") from None
        return iter(r.text.splitlines())
    try:
        f = open(name, encoding="utf-8")  # noqa: SIM115 -- closed when the lines run out
    except OSError as e:
        raise BatchError(f"cannot read the input file {name}: {e.strerror or e}") from None

    def lines() -> Iterator[str]:
        with f:
            yield from f

    return lines()


def count_lines(name: str) -> int | None:
    """The number of non-blank lines of a local input (the progress bar's total)."""
    if name == "-" or _is_url(name):
        return None
    with contextlib.suppress(OSError), open(name, "rb") as f:
        return sum(1 for line in f if line.strip())
    return None


class Output:
    """The output file: local (opened now, so an unwritable one fails before the model loads),
    stdout, or a temporary local file PUT to an http(s) URL at the end."""

    def __init__(self, name: str, tmp_dir: str | None) -> None:
        self.name = name
        self.tmp_path: str | None = None
        self.created = False  # a local file this run made (removed if the run fails first)
        try:
            if name == "-":
                self.f: IO[str] = sys.stdout
            elif _is_url(name):
                fd, self.tmp_path = tempfile.mkstemp(prefix="batch_output_", suffix=".jsonl",
                                                     dir=tmp_dir)
                self.f = os.fdopen(fd, "w", encoding="utf-8")
            else:
                self.created = not os.path.exists(name)
                self.f = open(name, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise BatchError(f"cannot write the output file {name}: {e.strerror or e}") from None
        self.next = 0
        self.pending: dict[int, dict[str, Any]] = {}

    def put(self, index: int, out: dict[str, Any]) -> None:
        """Keep `out` until every earlier line is written: the output is in input order."""
        self.pending[index] = out
        while self.next in self.pending:
            self.f.write(json.dumps(self.pending.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1

    def close(self, upload: bool) -> None:
        import httpx

        if self.f is not sys.stdout:
            self.f.close()
        else:
            self.f.flush()
        if not upload and self.created and self.next == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.name)
        if self.tmp_path is None:
            return
        try:
            if upload:
                with open(self.tmp_path, "rb") as f:
                    r = httpx.put(self.name, content=f, timeout=1000)
                if r.status_code != 200:
                    raise BatchError(f"cannot upload the output to {self.name}: HTTP "
                                     f"{r.status_code} {r.text[:200]}")
        except httpx.HTTPError as e:
            raise BatchError(f"cannot upload the output to {self.name}: {e}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_path)


# -- the run -----------------------------------------------------------------------------
class _NotServing(logging.Filter):
    """The server's "OpenAI API ready at http://..." line: nothing listens in a batch run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("OpenAI API ready")


async def run_batch(args: argparse.Namespace) -> int:
    from fastapi import FastAPI

    from modelport.entrypoints.openai.api_server import attach

    if getattr(args, "enable_metrics", False):
        raise BatchError("--enable-metrics (a Prometheus server for the batch run) is not "
                         "supported; the run's counts are in its log")
    lines = open_input(args.input_file)
    total = count_lines(args.input_file)
    output = Output(args.output_file, getattr(args, "output_tmp_dir", None))
    ok = False
    service = None
    try:
        app = FastAPI()
        try:
            service = attach(app, args, exit_on_failure=False, all_paths=True)
        except SystemExit as e:  # a refused flag or a missing model: the server's message
            msg = str(e.code).replace("modelport serve:", f"{PROG}:", 1)
            raise BatchError(msg.removeprefix(f"{PROG}: ")) from None
        state = app.state.openai
        logging.getLogger("modelport.openai").addFilter(_NotServing())
        await service.start()
        await service.loaded.wait()
        if state.engine is None:
            raise BatchError(f"the model failed to load: {state.load_error}")
        engine = state.engine
        in_flight = max(1, 2 * engine.max_num_seqs
                        * engine.engine_config.parallel_config.data_parallel_size)
        headers = {"Content-Type": "application/json"}
        keys = state.api_key
        if keys:
            headers["Authorization"] = f"Bearer {keys if isinstance(keys, str) else keys[0]}"
        counts = await _run_lines(app, lines, output, in_flight, headers, total)
        logger.info("batch done: %d requests, %d succeeded, %d failed; results in %s",
                    counts[0] + counts[1], counts[0], counts[1], args.output_file)
        ok = True
    finally:
        if service is not None:
            await service.stop()
        try:
            output.close(upload=ok)
        except BatchError:
            if ok:
                raise
    return 0


async def _run_lines(app: Any, lines: Iterator[str], output: Output, in_flight: int,
                     headers: dict[str, str], total: int | None) -> tuple[int, int]:
    import httpx
    from tqdm import tqdm

    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task] = set()
    counts = [0, 0]  # succeeded, failed
    bar = tqdm(total=total, unit="req", desc="Running batch", mininterval=5, file=sys.stderr,
               bar_format=_BAR_FORMAT)

    def done(index: int, out: dict[str, Any]) -> None:
        output.put(index, out)
        counts[0 if out["error"] is None else 1] += 1
        bar.update()

    async def one(client: httpx.AsyncClient, index: int, req: dict[str, Any]) -> None:
        try:
            r = await client.post(req["url"], json=req["body"], headers=headers)
            try:
                body = r.json()
            except ValueError:
                body = None
            if r.status_code == 200 and body is not None:
                out = success_output(req["custom_id"], 200, body)
            elif isinstance(body, dict) and "error" in body:
                out = error_output(req["custom_id"], body, r.status_code)
            else:
                out = error_output(req["custom_id"], r.text or f"HTTP {r.status_code}",
                                   r.status_code)
        except Exception as e:  # a fault on the way (vLLM: the exception's text, 400)
            out = error_output(req["custom_id"], str(e) or type(e).__name__)
        finally:
            slots.release()
        done(index, out)

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://run-batch",
                                 timeout=None) as client:
        try:
            index = 0
            for line in lines:
                if not line.strip():
                    continue  # vLLM skips blank lines
                req, err = parse_line(line)
                if err is not None:
                    done(index, err)
                else:
                    await slots.acquire()
                    t = asyncio.create_task(one(client, index, req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                index += 1
            if bar.total is None or bar.total != index:
                bar.total = index
                bar.refresh()
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in list(tasks):
                t.cancel()
            bar.close()
    return counts[0], counts[1]


def run_batch_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    from modelport.entrypoints.cli_serve import run_event_loop

    try:
        return run_event_loop(run_batch(args))
    except BatchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run_batch_command(args)


if __name__ == "__main__":
    sys.exit(main())
