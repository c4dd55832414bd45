"""`modelport serve`: one process, one HTTP port, every frontend that has something to serve.

Frontends plug in through a small interface (a module with):
    add_serve_args(parser)                 -- its flags
    wants(args) -> bool                    -- whether these args ask for it
    async build(args, app) -> Service      -- mount routes on the shared FastAPI app
A Service has `async start()` (extra ports, background tasks) and `async stop()`, and may
have `listen`: a (host, port) for the shared app instead of --host/--port (TorchServe's
config inference_address when it is the only frontend; see `args.serve_frontends`).
The OpenAI frontend serves the embedded default model when nothing else is asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from modelport.entrypoints.torchserve import start_stop

logger = logging.getLogger("modelport.serve")

FRONTENDS = (
    "modelport.entrypoints.openai.frontend",
    "modelport.entrypoints.kserve.frontend",
    "modelport.entrypoints.torchserve.frontend",
)


# frontends left out because a package they need is missing: module -> the reason
UNAVAILABLE: dict[str, str] = {}


def _available_frontends() -> list[Any]:
    """The frontend modules that import here. One whose third-party package is missing (a
    trimmed environment: e.g. no tritonclient) is left out and named in UNAVAILABLE, so the
    other frontends still serve; a missing module of modelport itself is a bug and raises."""
    mods = []
    for name in FRONTENDS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that frontend is not built yet
            if e.name is None or e.name.split(".")[0] == "modelport":
                raise
            UNAVAILABLE[name] = f"needs the package {e.name.split('.')[0]!r}, not installed here"
    return mods


def _unavailable_note() -> str:
    return "; ".join(f"{n.rsplit('.', 2)[-2]} frontend off: {why}" for n, why in UNAVAILABLE.items())


class _StoreGiven(argparse.Action):
    """Store the value and note in `<dest>_given` that it was typed, not defaulted."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, action=_StoreGiven, help="HTTP port (default 8000)"
    )
    parser.set_defaults(port_given=False)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP (OpenAI, KServe v2, TorchServe)")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve, as in `vllm serve MODEL` (the same as --model)")
    add_common_args(p)
    for mod in _available_frontends():
        mod.add_serve_args(p)
    note = _unavailable_note()  # a left-out frontend's flags are unknown here: say why
    p.epilog = note or None
    p.set_defaults(func=run_serve, unrecognized_hint=note)


def take_model_tag(args: argparse.Namespace) -> None:
    """`modelport serve MODEL` (vLLM's positional form) is `--model MODEL`."""
    tag = getattr(args, "model_tag", None)
    if tag is None:
        # `serve --api-key KEY MODEL`: --api-key takes every word after it (vLLM's nargs), so
        # MODEL became a second key and the default model would be served; say so instead
        keys = getattr(args, "api_key", None) or []
        paths = [k for k in keys[1:] if os.path.exists(k)]
        if getattr(args, "model", None) is None and paths:
            raise SystemExit(f"modelport serve: --api-key took the path {paths[0]!r} as a key; "
                             "give the model first (`modelport serve MODEL --api-key KEY`) or "
                             "as --model")
        return
    given = getattr(args, "model", None)
    if given is not None and given != tag:
        raise SystemExit(f"modelport serve: the model is given twice, {tag!r} and --model "
                         f"{given!r}: give one")
    args.model = tag


async def serve_async(args: argparse.Namespace) -> int:
    """Serve until shut down; 1 when a frontend's model failed to load and stopped the server."""
    import uvicorn
    from fastapi import FastAPI

    take_model_tag(args)
    mods = _available_frontends()
    if UNAVAILABLE:
        logger.warning("%s", _unavailable_note())
    chosen = [m for m in mods if m.wants(args)]
    if not chosen:
        raise SystemExit("nothing to serve: give --model, --model-repository or --model-store")
    services: list[Any] = []
    stop_all = stopper(services)
    from modelport.entrypoints.vllm_compat import fastapi_kwargs, uvicorn_kwargs

    app = FastAPI(title="modelport", version=_version(), lifespan=stop_at_shutdown(stop_all),
                  **fastapi_kwargs(args))
    args.serve_frontends = tuple(m.__name__ for m in chosen)
    services += [await m.build(args, app) for m in chosen]
    host, port = args.host, args.port
    for s in services:
        if getattr(s, "listen", None) is not None:
            host, port = s.listen
    kw = uvicorn_kwargs(args)
    for s in services:  # a frontend's own HTTP protocol (TorchServe's reason phrases)
        if getattr(s, "http_protocol", None) is not None:
            kw["http"] = s.http_protocol
    config = uvicorn.Config(app, host=host, port=port, **kw)
    server = uvicorn.Server(config)
    for s in services:
        if hasattr(s, "http_server"):
            s.http_server = server  # a service whose model fails to load stops the server
    try:
        for s in services:
            await s.start()
        http = all(getattr(s, "http", True) for s in services)  # --allow-http false: none
        if http:
            logger.info("serving on %s", f"unix:{kw['uds']}" if kw.get("uds")
                        else f"http://{host}:{port}")
        # for --start: the URL it pings (none without HTTP: --start then waits it out)
        announce = start_stop.announce_when_started(server, host, port) if http else None
        ready = asyncio.get_running_loop().create_task(announce) if announce else None
        try:
            await server.serve(sockets=None if http else [])
        finally:
            if ready is not None:
                ready.cancel()
    finally:
        await stop_all()
    return 1 if any(getattr(s, "failed", False) for s in services) else 0


def stopper(services: list[Any]) -> Callable[[], Awaitable[None]]:
    """Stop the services once, last started first (from the app's shutdown or a failure)."""
    done = False

    async def stop_all() -> None:
        nonlocal done
        if done:
            return
        done = True
        for s in reversed(services):
            with contextlib.suppress(Exception):
                await s.stop()

    return stop_all


def stop_at_shutdown(stop_all: Callable[[], Awaitable[None]]) -> Callable[[Any], Any]:
    """A lifespan that stops the services in uvicorn's shutdown: before uvicorn re-raises a
    SIGTERM it caught (which ends the process at once), so engines and model processes are
    stopped in order and not left behind."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await stop_all()

    return lifespan


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("modelport")
    except Exception:
        return "0.0.0"


def run_serve(args: argparse.Namespace) -> int:
    """Serve in this process; TorchServe's `--start` launches the server in the background
    and `--stop` stops it (see torchserve/start_stop.py)."""
    start_stop.refuse_unsupported(args)
    if getattr(args, "ts_stop", False):
        return start_stop.stop(args)
    if getattr(args, "ts_start", False) and not getattr(args, "ts_foreground", False):
        return start_stop.start_background(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with start_stop.owned_pid_file(args):  # --start --foreground, or the server --start ran
        return run_event_loop(serve_async(args))


def run_event_loop(main: Awaitable[int]) -> int:
    """asyncio.run(main) on uvloop's event loop where it is installed (uvicorn[standard]
    brings it; uvicorn picks it only in uvicorn.run, not in a loop of our own). Its socket
    writes and thread wake-ups cost a fraction of the stdlib loop's, and a streamed answer
    is one write a token. MODELPORT_UVLOOP=0 keeps the stdlib loop."""
    import os

    factory = None
    if os.environ.get("MODELPORT_UVLOOP", "1") != "0" and hasattr(asyncio, "Runner"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    if factory is None:
        return asyncio.run(main)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)  # type: ignore[arg-type]
