"""Run `EngineCore` in its own process and talk to it with typed msgspec messages over pipes.

Why a process: the HTTP server tokenizes, detokenizes and streams in Python; in the same
process that work would hold the GIL while the model should be stepping. The core process
runs a busy loop: take every pending message, step while any request has work, send the
outputs of each step back, and block on the pipe only when idle.

Why threads on the client side: a pipe write can block when the core is mid-step and the
pipe buffer is full, and a pipe read always blocks; a writer thread and a reader thread keep
both off the asyncio event loop. The reader thread learns of the core's death from EOF on
the pipe (the core's end is closed in this process), so a crash is reported to every
waiting request instead of hanging them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import msgspec

from modelport.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
)

logger = logging.getLogger("modelport.engine.core_client")


# ---------------------------------------------------------------- messages to the core


class AddRequest(msgspec.Struct, tag="add"):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class RemoveLoRA(msgspec.Struct, tag="remove_lora"):
    """The server unloaded an adapter: the core forgets its loaded copy and device slot."""

    lora_int_id: int


class Sleep(msgspec.Struct, tag="sleep"):
    """Sleep mode: once the requests in the core have finished, free the KV cache and
    offload (level 1) or drop (level 2) the weights; requests that arrive meanwhile wait."""

    level: int


class WakeUp(msgspec.Struct, tag="wake_up"):
    """Restore what Sleep freed ("weights", "kv_cache"; None: both)."""

    tags: list[str] | None = None


class Profile(msgspec.Struct, tag="profile"):
    """vLLM's torch profiler (engine/torch_profiler.py): "start" or "stop" recording in the
    core and its tensor-parallel ranks; answered at once (between steps) by CoreProfiled."""

    action: str


class ResetPrefixCache(msgspec.Struct, tag="reset_prefix_cache"):
    """Forget every cached prefix block (vLLM's reset_prefix_cache); answered at once
    (between steps) by CorePrefixCacheReset."""


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


ToCore = (AddRequest | AbortRequests | RemoveLoRA | Sleep | WakeUp | Profile | ResetPrefixCache
          | Shutdown)


# ---------------------------------------------------------------- messages from the core


class CoreReady(msgspec.Struct, tag="ready"):
    """Sent once the model is loaded and the KV cache allocated: what the core has."""

    num_kv_blocks: int
    block_size: int
    device: str
    load_seconds: float


class CoreStepOutputs(msgspec.Struct, tag="outputs"):
    outputs: EngineCoreOutputs


class CoreFailed(msgspec.Struct, tag="failed"):
    """The core hit an exception it cannot recover from (start-up or a step); it exits next."""

    message: str
    traceback: str


class CoreRejected(msgspec.Struct, tag="rejected"):
    """The core refused one request (invalid, or its queue is full); the core itself is fine."""

    request_id: str
    kind: str  # "invalid" | "queue_full"
    message: str


class CoreSleepState(msgspec.Struct, tag="sleep_state"):
    """The answer to one Sleep or WakeUp, in their order, once it took effect (or failed)."""

    is_sleeping: bool
    error: str | None = None


class CoreProfiled(msgspec.Struct, tag="profiled"):
    """The answer to one Profile, in their order: None, or why it could not (profiler off,
    already running, not running)."""

    error: str | None = None


class CorePrefixCacheReset(msgspec.Struct, tag="prefix_cache_reset"):
    """The answer to one ResetPrefixCache, in their order: whether the cache was reset
    (False: running requests hold blocks, so nothing was reset, as in vLLM);
    `failed_replicas`: the data-parallel replicas that could not reset (the DP client's)."""

    reset: bool
    failed_replicas: list[int] = msgspec.field(default_factory=list)


FromCore = (CoreReady | CoreStepOutputs | CoreFailed | CoreRejected | CoreSleepState
            | CoreProfiled | CorePrefixCacheReset)

_to_core_encoder = msgspec.msgpack.Encoder()
_to_core_decoder = msgspec.msgpack.Decoder(ToCore)
_from_core_encoder = msgspec.msgpack.Encoder()
_from_core_decoder = msgspec.msgpack.Decoder(FromCore)


class EngineDeadError(RuntimeError):
    """The engine core process is gone; every request in flight failed with it."""


# ---------------------------------------------------------------- the core process


def _describe_device(engine_config: Any) -> str:
    device = str(getattr(engine_config, "device", "unknown"))
    if device.startswith("cuda"):
        try:
            import torch

            return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        except Exception:
            return device
    return device


def prepare_child_process() -> None:
    """For a process the server owns (the engine core, a tensor-parallel rank).

    Ctrl-C in a terminal reaches the whole process group, and a service manager's stop
    (systemd's default) signals every process of the service; the owner shuts its children
    down in order (requests answered first), so they ignore SIGINT and SIGTERM (an owner
    that is gone closes their pipe, and they exit on that). tqdm's loading bars would make a
    cross-process lock: a named semaphore that the resource tracker reports as leaked when
    the process ends before tqdm's finalizer runs; a thread lock is all one process needs.
    """
    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())


def run_engine_core(engine_config: Any, in_conn: Any, out_conn: Any, log_level: int = 20) -> None:
    """Entry point of the core process: load, report ready, then the busy loop until shutdown."""
    prepare_child_process()
    if engine_config.cuda_visible_devices is not None:  # before CUDA starts; ranks inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = engine_config.cuda_visible_devices
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s"
    )
    from modelport.engine.core import EngineCore

    def send(msg: FromCore) -> None:
        out_conn.send_bytes(_from_core_encoder.encode(msg))

    t0 = time.monotonic()
    try:
        core = EngineCore(engine_config)
    except BaseException as e:  # report why, then exit: the parent turns this into an error
        with contextlib.suppress(Exception):
            send(CoreFailed(message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()))
        return
    try:
        send(
            CoreReady(
                num_kv_blocks=int(core.num_kv_blocks),
                block_size=int(core.block_size),
                device=_describe_device(engine_config),
                load_seconds=time.monotonic() - t0,
            )
        )
        _busy_loop(core, in_conn, send)
    except (EOFError, OSError, BrokenPipeError):
        return  # the parent went away (also while the core was loading): nothing to serve
    except BaseException as e:
        with contextlib.suppress(Exception):
            send(CoreFailed(message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            core.shutdown()


def _busy_loop(core: Any, in_conn: Any, send: Callable[[FromCore], None]) -> None:
    aborted: list[EngineCoreOutput] = []
    # sleep mode: a Sleep waits here until the core's requests have finished; requests that
    # arrive from then until the core is fully awake are held, then added in their order
    sleep_pending: Sleep | None = None
    sleep_asks = 0  # Sleep messages that the pending sleep answers (each gets one answer)
    held: list[EngineCoreRequest] = []

    def add(request: EngineCoreRequest) -> None:
        try:
            core.add_request(request)
        except Exception as e:  # one bad request must not take the core down
            kind = "queue_full" if type(e).__name__ == "QueueFullError" else "invalid"
            send(CoreRejected(request_id=request.request_id, kind=kind, message=str(e)))

    def sleep_state(error: str | None = None) -> CoreSleepState:
        return CoreSleepState(is_sleeping=bool(core.is_sleeping), error=error)

    while True:
        if sleep_pending is not None and not core.has_unfinished_requests():
            error = None
            try:
                core.sleep(sleep_pending.level)
            except ValueError as e:
                error = str(e)
            for _ in range(sleep_asks):
                send(sleep_state(error))
            sleep_pending, sleep_asks = None, 0
            if not core.is_sleeping:  # it failed: the held requests run now
                for r in held:
                    add(r)
                held = []
        idle = not core.has_unfinished_requests()
        handled = False
        # Block only when idle; otherwise take what is queued and go on stepping.
        while in_conn.poll(None if idle and not handled else 0):
            msg = _to_core_decoder.decode(in_conn.recv_bytes())
            handled = True
            if isinstance(msg, AddRequest):
                if sleep_pending is not None or core.is_sleeping:
                    held.append(msg.request)
                else:
                    add(msg.request)
            elif isinstance(msg, AbortRequests):
                ids = set(msg.request_ids)
                aborted.extend(EngineCoreOutput(request_id=r.request_id, new_token_ids=[],
                                                finish_reason="abort")
                               for r in held if r.request_id in ids)
                held = [r for r in held if r.request_id not in ids]
                aborted.extend(core.abort_requests(msg.request_ids) or [])
            elif isinstance(msg, RemoveLoRA):
                core.remove_lora(msg.lora_int_id)
            elif isinstance(msg, Profile):
                send(_profile(core, msg.action))
            elif isinstance(msg, ResetPrefixCache):
                send(CorePrefixCacheReset(reset=bool(core.reset_prefix_cache())))
            elif isinstance(msg, Sleep):
                if sleep_pending is not None:  # one sleep, at the deeper level
                    msg = Sleep(level=max(msg.level, sleep_pending.level))
                sleep_pending = msg
                sleep_asks += 1
                break  # sleep as soon as the core is idle, before the next poll blocks
            elif isinstance(msg, WakeUp):
                if sleep_pending is not None:  # the sleep never happens: it is answered
                    for _ in range(sleep_asks):
                        send(sleep_state())
                    sleep_pending, sleep_asks = None, 0
                try:
                    core.wake_up(msg.tags)
                    send(sleep_state())
                except ValueError as e:
                    send(sleep_state(str(e)))
                if not core.is_sleeping:
                    for r in held:
                        add(r)
                    held = []
            else:
                return
        if core.has_unfinished_requests():
            out = core.step()
            out.outputs = aborted + out.outputs
            out.stats = core.get_stats()
            send(CoreStepOutputs(outputs=out))
            # requests whose grammar failed to compile: refused as an invalid request is
            for rid, why in core.take_rejected():
                send(CoreRejected(request_id=rid, kind="invalid", message=why))
        elif handled:
            # e.g. an abort emptied the engine: publish it and the idle stats right away
            send(
                CoreStepOutputs(outputs=EngineCoreOutputs(outputs=aborted, stats=core.get_stats()))
            )
        aborted = []


def _profile(core: Any, action: str) -> CoreProfiled:
    from modelport.engine.torch_profiler import TorchProfilerError

    try:
        if action == "start":
            core.start_profile()
        else:
            core.stop_profile()
    except TorchProfilerError as e:  # the caller's mistake: the core serves on
        return CoreProfiled(error=str(e))
    except Exception as e:  # e.g. the trace could not be written: the core serves on
        logger.exception("torch profiler %s failed", action)
        return CoreProfiled(error=f"torch profiler {action} failed: {type(e).__name__}: {e}")
    return CoreProfiled()


# ---------------------------------------------------------------- the client


class EngineCoreClient:
    """Owns the core process; thread-safe `add_request` / `abort`; outputs go to a callback.

    `on_message` is called from the reader thread with each CoreStepOutputs / CoreRejected, and with an
    EngineDeadError once if the core dies. Callers that live on an event loop hop over with
    `loop.call_soon_threadsafe` (AsyncLLM does).
    """

    def __init__(
        self,
        engine_config: Any,
        on_message: Callable[[CoreStepOutputs | CoreRejected | EngineDeadError], None],
        *,
        startup_timeout: float = 600.0,
    ) -> None:
        self.engine_config = engine_config
        self._on_message = on_message
        ctx = mp.get_context("spawn")
        core_in_recv, self._in_send = ctx.Pipe(duplex=False)
        self._out_recv, core_out_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=run_engine_core,
            args=(
                engine_config,
                core_in_recv,
                core_out_send,
                logging.getLogger().getEffectiveLevel(),
            ),
            name="modelport-engine-core",
            # not daemonic: a core may start processes of its own (tensor-parallel workers);
            # the finalizer below still kills it if this process exits without shutdown()
            daemon=False,
        )
        self._proc.start()
        self._finalizer = weakref.finalize(self, _kill_process, self._proc)
        # Close our copies of the core's ends so EOF reaches us when the core exits.
        core_in_recv.close()
        core_out_send.close()
        self.dead: EngineDeadError | None = None
        self._closing = False  # shutdown() asked the core to stop: its exit is no death
        self.ready = self._wait_ready(startup_timeout)
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="core-writer", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="core-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    # -- start-up (blocking: call from a worker thread when on an event loop)

    def _wait_ready(self, timeout: float) -> CoreReady:
        deadline = time.monotonic() + timeout
        while not self._out_recv.poll(0.2):
            if not self._proc.is_alive():
                raise RuntimeError(
                    f"engine core process exited during start-up (exit code {self._proc.exitcode})"
                )
            if time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(f"engine core did not start within {timeout:.0f}s")
        try:
            msg = _from_core_decoder.decode(self._out_recv.recv_bytes())
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(
                f"engine core process exited during start-up (exit code {self._proc.exitcode})"
            ) from None
        if isinstance(msg, CoreFailed):
            self._proc.join(5)
            raise RuntimeError(f"engine core failed to start: {msg.message}\n{msg.traceback}")
        if not isinstance(msg, CoreReady):
            self._kill()
            raise RuntimeError(f"engine core sent {type(msg).__name__} before ready")
        return msg

    # -- threads

    def _write_loop(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self._in_send.send_bytes(data)
            except (OSError, BrokenPipeError, ValueError):
                return  # the reader reports the death

    def _read_loop(self) -> None:
        reason = "engine core process exited"
        while True:
            try:
                msg = _from_core_decoder.decode(self._out_recv.recv_bytes())
            except (EOFError, OSError):
                break
            except msgspec.DecodeError as e:
                reason = f"bad message from engine core: {e}"
                self._kill()
                break
            if isinstance(msg, (CoreStepOutputs, CoreRejected, CoreSleepState, CoreProfiled,
                                CorePrefixCacheReset)):
                self._on_message(msg)
            elif isinstance(msg, CoreFailed):
                reason = f"engine core failed: {msg.message}"
                logger.error("engine core failed: %s\n%s", msg.message, msg.traceback)
        self._proc.join(5)
        if self._proc.exitcode not in (None, 0):
            reason += f" (exit code {self._proc.exitcode})"
        self.dead = EngineDeadError("engine core shut down" if self._closing else reason)
        if not self._closing:
            self._on_message(self.dead)

    # -- API

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(AddRequest(request=request))

    def add_requests(self, requests: list[EngineCoreRequest]) -> int:
        """One user request's engine requests (its n samples), in order; returns the index
        of the engine that took them (always 0: one engine)."""
        for r in requests:
            self.add_request(r)
        return 0

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(AbortRequests(request_ids=list(request_ids)))

    def remove_lora(self, lora_int_id: int) -> None:
        """Make the core forget an adapter (requests already sent keep theirs)."""
        self._send(RemoveLoRA(lora_int_id=lora_int_id))

    def sleep(self, level: int) -> None:
        """Answered by one CoreSleepState (to on_message) once the core sleeps."""
        self._send(Sleep(level=level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Answered by one CoreSleepState (to on_message) once the core woke."""
        self._send(WakeUp(tags=list(tags) if tags is not None else None))

    def profile(self, action: str) -> None:
        """"start" / "stop" the torch profiler; answered by one CoreProfiled (to on_message)."""
        self._send(Profile(action=action))

    def reset_prefix_cache(self) -> None:
        """Answered by one CorePrefixCacheReset (to on_message)."""
        self._send(ResetPrefixCache())

    def _send(self, msg: ToCore) -> None:
        if self.dead is not None:
            raise self.dead
        self._outbox.put(_to_core_encoder.encode(msg))

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to stop, then make sure it has: join, terminate, kill."""
        self._closing = True
        if self._proc.is_alive():
            with contextlib.suppress(Exception):
                self._outbox.put(_to_core_encoder.encode(Shutdown()))
            self._proc.join(timeout)
        self._kill()
        self._outbox.put(None)
        with contextlib.suppress(Exception):
            self._in_send.close()

    def _kill(self) -> None:
        _kill_process(self._proc)


def _kill_process(proc: Any) -> None:
    if proc.is_alive():  # SIGKILL: the core ignores SIGTERM (prepare_child_process)
        proc.kill()
        proc.join(2)


# ---------------------------------------------------------------- data parallelism


def replica_config(engine_config: Any, rank: int) -> Any:
    """The config of data-parallel replica `rank`: its own devices, from the first one given
    on (replica r of tensor-parallel groups of t GPUs starts at GPU first + r * t)."""
    par = dataclasses.replace(engine_config.parallel_config, data_parallel_rank=rank)
    device = engine_config.device
    if device.startswith("cuda"):
        first = int(device.partition(":")[2] or 0)
        device = f"cuda:{first + rank * par.tensor_parallel_size}"
    return dataclasses.replace(engine_config, parallel_config=par, device=device)


def merge_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """The replicas' latest stats as one engine's: counts add up, KV usage by blocks."""
    blocks = sum(s.num_kv_blocks for s in stats)
    per_pos = [sum(col) for col in zip(*(s.spec_num_accepted_per_pos for s in stats))]
    return SchedulerStats(
        num_running=sum(s.num_running for s in stats),
        num_waiting=sum(s.num_waiting for s in stats),
        kv_cache_usage=(sum(s.kv_cache_usage * s.num_kv_blocks for s in stats) / blocks
                        if blocks else 0.0),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_preemptions=sum(s.num_preemptions for s in stats),
        spec_num_drafts=sum(s.spec_num_drafts for s in stats),
        spec_num_draft_tokens=sum(s.spec_num_draft_tokens for s in stats),
        spec_num_accepted_tokens=sum(s.spec_num_accepted_tokens for s in stats),
        spec_num_accepted_per_pos=per_pos,
        num_kv_blocks=blocks,
        block_size=max(s.block_size for s in stats),
        running_lora_adapters=list(dict.fromkeys(
            n for s in stats for n in s.running_lora_adapters)),
        waiting_lora_adapters=list(dict.fromkeys(
            n for s in stats for n in s.waiting_lora_adapters)),
    )


class DPEngineCoreClient:
    """`data_parallel_size` engine cores (replicas, each its own process, devices and KV
    cache) behind EngineCoreClient's interface, so AsyncLLM serves them as one engine.

    A user request (all its n samples, which share the prompt's KV blocks) goes to the
    replica with the fewest sequences in flight; its aborts follow it there; an adapter's
    removal (the server's /v1/unload_lora_adapter) goes to every replica. Each step's outputs
    reach `on_message` as the replica sent them, marked with its index (`engine_index`, the
    metrics' `engine` label) and, where they carry stats, with every replica's latest stats
    merged beside them (`merged_stats`: admission control's view of the whole engine;
    cumulative counters stay monotonic: they are merged and passed on under one lock). The
    first replica to die ends the engine, as one core's death does: its requests cannot move
    to another replica mid-stream.
    """

    def __init__(
        self,
        engine_config: Any,
        on_message: Callable[[CoreStepOutputs | CoreRejected | EngineDeadError], None],
        *,
        startup_timeout: float = 600.0,
    ) -> None:
        size = engine_config.parallel_config.data_parallel_size
        self._on_message = on_message
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}  # engine request id -> replica
        self._inflight = [0] * size
        self.num_added = [0] * size  # engine requests each replica was given (cumulative)
        self._stats = [SchedulerStats() for _ in range(size)]
        # control calls sent to every replica (sleep mode's Sleep / WakeUp, the torch
        # profiler's Profile, ResetPrefixCache): each replica answers them in order, and the
        # k-th answers of all replicas make the one answer passed on (see _gather)
        self._answered: dict[type, list[int]] = {}  # answer type -> answers from each replica
        self._answers: dict[tuple[type, int], list[tuple[int, Any]]] = {}  # (type, k) -> got
        self._closing = False
        self.dead: EngineDeadError | None = None
        clients: list[EngineCoreClient | None] = [None] * size
        errors: list[BaseException | None] = [None] * size

        def start(rank: int) -> None:
            try:
                clients[rank] = EngineCoreClient(
                    replica_config(engine_config, rank),
                    lambda msg: self._from_core(rank, msg),
                    startup_timeout=startup_timeout,
                )
            except BaseException as e:  # noqa: BLE001 - reported below, after the others
                errors[rank] = e

        threads = [threading.Thread(target=start, args=(r,), name=f"dp-start-{r}")
                   for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            self._closing = True
            for c in clients:
                if c is not None:
                    c.shutdown()
            rank, err = failed[0]
            raise RuntimeError(f"data-parallel replica {rank} of {size}: {err}") from err
        self.clients: list[EngineCoreClient] = [c for c in clients if c is not None]
        readies = [c.ready for c in self.clients]
        self.ready = CoreReady(
            num_kv_blocks=sum(r.num_kv_blocks for r in readies),
            block_size=readies[0].block_size,
            device=", ".join(r.device for r in readies),
            load_seconds=max(r.load_seconds for r in readies),
        )

    # -- from the replicas' reader threads

    def _from_core(self, rank: int, msg: Any) -> None:
        if isinstance(msg, EngineDeadError):
            with self._lock:
                if self._closing or self.dead is not None:
                    return
                self.dead = EngineDeadError(f"data-parallel replica {rank}: {msg}")
            self._on_message(self.dead)
            return
        with self._lock:
            if isinstance(msg, CoreSleepState):
                answers = self._gather(rank, msg)
                if answers is None:
                    return
                errors = [f"data-parallel replica {r}: {a.error}" for r, a in answers if a.error]
                msg = CoreSleepState(is_sleeping=any(a.is_sleeping for _, a in answers),
                                     error="; ".join(errors) or None)
            elif isinstance(msg, CoreProfiled):
                got = self._gather(rank, msg)
                if got is None:
                    return
                errors = sorted({a.error for _, a in got if a.error})  # the same from each
                msg = CoreProfiled(error="; ".join(errors) or None)
            elif isinstance(msg, CorePrefixCacheReset):
                resets = self._gather(rank, msg)
                if resets is None:
                    return
                failed = sorted(r for r, a in resets if not a.reset)
                msg = CorePrefixCacheReset(reset=not failed, failed_replicas=failed)
            elif isinstance(msg, CoreStepOutputs):
                for out in msg.outputs.outputs:
                    if out.finished:
                        self._release(out.request_id)
                # the replica's own step (its stats, outputs and step tokens: the metrics'
                # engine label), with the merged stats of all of them beside
                outs = msg.outputs
                outs.engine_index = rank
                if outs.stats is not None:
                    self._stats[rank] = outs.stats
                    outs.merged_stats = merge_stats(self._stats)
            elif isinstance(msg, CoreRejected):
                self._release(msg.request_id)
            self._on_message(msg)

    def _gather(self, rank: int, answer: Any) -> list[tuple[int, Any]] | None:
        """A replica's answer to a control call sent to all of them (under the lock): None
        until every replica has answered that call, then all the answers, by replica."""
        counts = self._answered.setdefault(type(answer), [0] * len(self._stats))
        k = counts[rank]
        counts[rank] += 1
        got = self._answers.setdefault((type(answer), k), [])
        got.append((rank, answer))
        if len(got) < len(counts):
            return None
        del self._answers[(type(answer), k)]
        return sorted(got, key=lambda ra: ra[0])

    def _release(self, request_id: str) -> None:
        rank = self._owner.pop(request_id, None)
        if rank is not None:
            self._inflight[rank] -= 1

    # -- API (EngineCoreClient's)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.add_requests([request])

    def add_requests(self, requests: list[EngineCoreRequest]) -> int:
        """All of them to one replica; returns its index."""
        if self.dead is not None:
            raise self.dead
        with self._lock:  # fewest in flight; on a tie, the one given fewest so far
            rank = min(range(len(self.clients)),
                       key=lambda r: (self._inflight[r], self.num_added[r]))
            for r in requests:
                self._owner[r.request_id] = rank
            self._inflight[rank] += len(requests)
            self.num_added[rank] += len(requests)
        self.clients[rank].add_requests(requests)
        return rank

    def abort_requests(self, request_ids: list[str]) -> None:
        by_rank: dict[int, list[str]] = {}
        with self._lock:
            for rid in request_ids:
                rank = self._owner.get(rid)
                if rank is not None:
                    by_rank.setdefault(rank, []).append(rid)
                    self._release(rid)
        for rank, ids in by_rank.items():
            self.clients[rank].abort_requests(ids)

    def remove_lora(self, lora_int_id: int) -> None:
        """Every replica forgets the adapter: a request for it may have reached any of them."""
        if self.dead is not None:
            raise self.dead
        for c in self.clients:
            c.remove_lora(lora_int_id)

    def sleep(self, level: int) -> None:
        """Every replica sleeps; one CoreSleepState answers once all of them have."""
        if self.dead is not None:
            raise self.dead
        for c in self.clients:
            c.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self.dead is not None:
            raise self.dead
        for c in self.clients:
            c.wake_up(tags)

    def profile(self, action: str) -> None:
        """Every replica starts / stops its profiler (its own traces); one CoreProfiled
        answers once all of them have."""
        if self.dead is not None:
            raise self.dead
        for c in self.clients:
            c.profile(action)

    def reset_prefix_cache(self) -> None:
        """Every replica resets its own prefix cache; one CorePrefixCacheReset answers once
        all of them have (reset only if every one did; the others in failed_replicas)."""
        if self.dead is not None:
            raise self.dead
        for c in self.clients:
            c.reset_prefix_cache()

    @property
    def is_alive(self) -> bool:
        return self.dead is None and all(c.is_alive for c in self.clients)

    @property
    def pid(self) -> int | None:
        return self.clients[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [c.pid for c in self.clients]

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closing = True
        threads = [threading.Thread(target=c.shutdown, args=(timeout,)) for c in self.clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def make_core_client(
    engine_config: Any,
    on_message: Callable[[CoreStepOutputs | CoreRejected | EngineDeadError], None],
    **kw: Any,
) -> EngineCoreClient | DPEngineCoreClient:
    """One engine core, or one per data-parallel replica."""
    if engine_config.parallel_config.data_parallel_size > 1:
        return DPEngineCoreClient(engine_config, on_message, **kw)
    return EngineCoreClient(engine_config, on_message, **kw)
