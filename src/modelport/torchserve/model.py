"""One registered model version: its worker processes and the batcher in front of them.

Requests go through the shared DynamicBatcher (batch_size / max_batch_delay), and each batch
runs on whichever worker process is idle. Workers can be added and removed while serving
(the scale API): the batcher is rebuilt for the new worker count and the old one drains.

A worker that fails to start or dies is started again, as TorchServe's WorkerThread retries
one: after 1, 1, 2, 3, 5, 8, ... seconds (its BACK_OFF), for as long as it has been down for
less than the model-config YAML's maxRetryTimeoutInSec (default 300) when it fails again.
Requests wait for it meanwhile; once every worker has given up they get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelport.serving.batcher import (
    BatcherConfig,
    BatcherStoppedError,
    DynamicBatcher,
    QueueFullError,
    QueuePolicy,
)
from modelport.serving.process_worker import (
    ProcessWorker,
    WorkerDiedError,
    WorkerError,
    WorkerTimeoutError,
)
from modelport.torchserve.archive import Manifest
from modelport.torchserve.errors import TSError, internal, service_unavailable
from modelport.torchserve.messages import BatchResult, ItemResponse, RequestItem
from modelport.torchserve.streaming import PartialResponses
from modelport.torchserve.ts_config import ModelSettings

logger = logging.getLogger("modelport.torchserve")

HANDLER_FACTORY = "modelport.torchserve.handler_service:HandlerService"
_worker_ids = itertools.count(9000)
# TorchServe's WorkerThread.BACK_OFF (seconds): a worker's n-th retry in a row waits BACK_OFF[n]
BACK_OFF = (0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597)


@dataclass(eq=False)
class _Slot:
    worker: ProcessWorker
    id: str
    start_time: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    )
    retired: bool = False
    gpu_id: int | None = None
    ready: bool = False  # started and in the pool (idle or running a batch)
    busy: bool = False  # running a batch
    # when it stopped serving (its start failed or it died), until it serves again:
    # TorchServe's recoveryStartTS
    down_since: float | None = None
    gave_up: bool = False  # down for maxRetryTimeoutInSec: no more retries
    restarts: int = 0  # starts after the first
    died: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None  # _keep_running


class WorkersFailedError(TSError):
    """Workers being added failed to start (they are retried in the background)."""


@dataclass(frozen=True)
class Outcome:
    """One request's result and how long it waited in the queue."""

    response: ItemResponse | TSError
    queue_latency_s: float


class ModelVersion:
    """A (name, version) served by `settings.min_workers..max_workers` handler processes."""

    def __init__(
        self,
        name: str,
        version: str,
        url: str,
        model_dir: Path,
        manifest: Manifest,
        settings: ModelSettings,
        *,
        handler: str | None = None,
        model_yaml: dict | None = None,
        loaded_at_startup: bool = False,
        extra_sys_path: list[str] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.url = url
        self.model_dir = model_dir
        self.manifest = manifest
        self.settings = settings
        self.handler = handler or manifest.handler
        self.model_yaml = model_yaml or {}
        self.loaded_at_startup = loaded_at_startup
        self.extra_sys_path = extra_sys_path or []
        self._slots: list[_Slot] = []
        self._idle: deque[_Slot] = deque()
        self._idle_event = asyncio.Event()
        self._batcher = self._new_batcher(1)
        self._batcher_instances = 0  # 0: not started yet
        self._retiring: set[asyncio.Task] = set()
        self._scale_lock = asyncio.Lock()
        self._stopped = False
        # workers being started; from the start, those register() starts next, so that a
        # model registered asynchronously is not reported lost before they had a chance
        self._starting = settings.min_workers
        self.batch_sizes_seen: list[int] = []  # for describe/debugging: recent batch sizes
        # request id -> consumer of that request's intermediate (streamed) responses
        self._streams: dict[str, Callable[[ItemResponse], None]] = {}
        # TorchServe's metrics config (metrics.yaml) for the handler, and where the metric
        # lines it logs go (set by the registry; None: the defaults / dropped)
        self.metrics_config: str | None = None
        self.metrics_sink: Callable[[tuple[str, ...]], None] | None = None
        # config.properties number_of_gpu: the most GPUs workers may use (None: all there are)
        self.max_gpus: int | None = None
        self.service_envelope: str | None = None  # config.properties': wins over the manifest's

    # -- workers --

    @property
    def num_workers(self) -> int:
        return len(self._slots)

    def _new_worker(self, gpu_id: int | None) -> ProcessWorker:
        return ProcessWorker(
            HANDLER_FACTORY,
            {
                "model_name": self.name,
                "model_dir": str(self.model_dir),
                "handler": self.handler,
                "batch_size": self.settings.batch_size,
                "gpu_id": gpu_id,
                "envelope": self.service_envelope or self.manifest.envelope,
                "model_yaml_config": self.model_yaml,
                "extra_sys_path": self.extra_sys_path,
                **({"metrics_config": self.metrics_config} if self.metrics_config else {}),
            },
            name=f"{self.name}/{self.version}",
            call_timeout=self.settings.response_timeout_s,
            restart=False,  # _keep_running restarts it, with TorchServe's backoff
        )

    async def scale(self, n: int, most: int | None = None) -> None:
        """Start or stop worker processes until `n` run; raises if a new one fails to load.

        With `most`, `n` is the least: the workers running are kept where they are within
        [n, most], as TorchServe's WorkLoadManager.modelChanged starts workers up to
        minWorkers and stops those past maxWorkers.
        """
        async with self._scale_lock:
            if most is not None:
                n = min(max(len(self._slots), n), most)
            self._starting = max(n - len(self._slots), 0)
            try:
                await self._scale_locked(n)
            finally:
                self._starting = 0

    async def _scale_locked(self, n: int) -> None:
        failed: list[BaseException] = []
        if n > len(self._slots):
            n_gpu = await asyncio.to_thread(self._visible_gpus)  # first call imports torch
            new = [
                _Slot(self._new_worker(gpu), str(next(_worker_ids)), gpu_id=gpu)
                for gpu in self._gpu_ids(n - len(self._slots), n_gpu)
            ]
            loop = asyncio.get_running_loop()
            firsts = []
            for slot in new:
                slot.worker.on_death = functools.partial(self._on_death, slot)
                first = loop.create_future()
                first.add_done_callback(_retrieved)
                slot.task = loop.create_task(self._keep_running(slot, first))
                firsts.append(first)
            self._slots.extend(new)
            self._starting = 0  # the slots count for themselves now
            self._swap_batcher(max(len(self._slots), 1))
            # TorchServe answers as soon as each new worker loaded or failed once; one that
            # failed keeps being retried (the registry removes a model whose synchronous
            # registration failed, which stops them)
            results = await asyncio.gather(*firsts, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
        while len(self._slots) > n:
            self._retire(self._slots.pop())
        self._idle_event.set()
        self._swap_batcher(max(len(self._slots), 1))
        if failed:
            logger.error("workers of %s/%s failed: %s", self.name, self.version, failed[0])
            first_line = (str(failed[0]).splitlines() or [""])[0]
            # TorchServe's words (ApiUtils.updateModelWorkers), then why
            raise WorkersFailedError(
                500,
                "InternalServerException",
                f"Failed to start workers for model {self.name} version: {self.version} "
                f"({first_line})",
            )

    def _retire(self, slot: _Slot) -> None:
        """Stop a slot scaled away: now, unless it runs a batch (then when that returns)."""
        slot.retired = True
        slot.died.set()  # wakes _keep_running, which sees `retired` and ends
        if slot in self._idle:
            self._idle.remove(slot)
        if not slot.busy:
            self._spawn(self._stop_slot(slot))

    async def _stop_slot(self, slot: _Slot) -> None:
        if slot.task is not None and slot.task is not asyncio.current_task():
            slot.task.cancel()
            with contextlib.suppress(BaseException):
                await slot.task
        await slot.worker.stop()

    def _on_death(self, slot: _Slot) -> None:
        """The worker's child died unasked (its in-flight batch, if any, already failed)."""
        slot.ready = False
        if slot in self._idle:
            self._idle.remove(slot)
        slot.died.set()

    async def _keep_running(self, slot: _Slot, first: asyncio.Future) -> None:
        """Start the slot's worker, and start it again whenever it fails to start or dies,
        as TorchServe's WorkerThread.retry: after BACK_OFF[1], BACK_OFF[2], ... seconds in a
        row (reset once it loads), until it has been down for maxRetryTimeoutInSec."""
        try:
            await self._run_slot(slot, first)
        finally:
            if not first.done():  # stopped before it ever served: whoever waits is told
                first.set_exception(internal(f"worker {slot.id} was stopped"))

    async def _run_slot(self, slot: _Slot, first: asyncio.Future) -> None:
        backoff = 0
        while not slot.retired:
            slot.died.clear()
            try:
                await slot.worker.start()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not first.done():
                    first.set_exception(e)
                # the traceback once, then its first line each retry
                why = str(e) if backoff == 0 else (str(e).splitlines() or [""])[0]
                logger.warning("worker %s of %s/%s failed to start: %s",
                               slot.id, self.name, self.version, why)  # fmt: skip
            else:
                if slot.retired:
                    break
                if slot.worker.alive:  # else it died already (on_death has set `died`)
                    if slot.down_since is not None:
                        logger.info("worker %s of %s/%s recovered",
                                    slot.id, self.name, self.version)  # fmt: skip
                    slot.down_since, backoff = None, 0
                    slot.ready = True
                    self._idle.append(slot)
                    self._idle_event.set()
                    if not first.done():
                        first.set_result(None)
                await slot.died.wait()
                if slot.retired:
                    break
                logger.warning("worker %s of %s/%s died", slot.id, self.name, self.version)
            now = time.monotonic()
            if slot.down_since is None:
                slot.down_since = now
            window = self.max_retry_timeout_s()
            if now - slot.down_since >= window:
                slot.gave_up = True
                self._idle_event.set()  # requests waiting for a worker may have none left
                logger.error("worker %s of %s/%s gave up: down for more than "
                             "maxRetryTimeoutInSec (%ds)", slot.id, self.name, self.version,
                             window)  # fmt: skip
                return
            backoff = min(backoff + 1, len(BACK_OFF) - 1)
            logger.info("retry worker %s of %s/%s in %d seconds",
                        slot.id, self.name, self.version, BACK_OFF[backoff])  # fmt: skip
            await asyncio.sleep(BACK_OFF[backoff])
            slot.restarts += 1

    def max_retry_timeout_s(self) -> int:
        return _yaml_int(self.model_yaml, "maxRetryTimeoutInSec", 300)

    def _gpu_ids(self, count: int, n_gpu: int) -> list[int | None]:
        """Spread workers over visible GPUs, as TorchServe assigns gpu_id to workers: none
        for a model-config YAML that says `deviceType: cpu`, and only its `deviceIds` when it
        lists valid ones (TorchServe's Model / WorkLoadManager)."""
        if n_gpu == 0 or str(self.model_yaml.get("deviceType", "")).lower() == "cpu":
            return [None] * count
        devices = self._device_ids(n_gpu) or list(range(n_gpu))
        used = [s.gpu_id for s in self._slots]
        out: list[int | None] = []
        for _ in range(count):
            gpu = min(devices, key=lambda g: (used + out).count(g))
            out.append(gpu)
        return out

    def _visible_gpus(self) -> int:
        """The GPUs workers may use: TorchServe's number_of_gpu, min(configured, there)."""
        n = gpu_count()
        return n if self.max_gpus is None else min(n, self.max_gpus)

    def _device_ids(self, n_gpu: int) -> list[int]:
        """The YAML's deviceIds; as TorchServe, one out of range voids the whole list."""
        ids = self.model_yaml.get("deviceIds")
        if not isinstance(ids, list) or not ids:
            return []
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_gpu
                   for i in ids):  # fmt: skip
            logger.warning("model %s: invalid deviceIds %s for %d GPUs; ignored",
                           self.name, ids, n_gpu)  # fmt: skip
            return []
        return ids

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _new_batcher(self, instances: int) -> DynamicBatcher:
        cfg = BatcherConfig(
            max_batch_size=self.settings.batch_size,
            max_queue_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            default_policy=QueuePolicy(max_queue_size=self.settings.job_queue_size),
        )
        return DynamicBatcher(cfg, self._execute, num_instances=instances)

    def _swap_batcher(self, instances: int) -> None:
        if self._batcher_instances == instances:
            return
        old, was_started = self._batcher, self._batcher_instances > 0
        self._batcher = self._new_batcher(instances)
        self._batcher.start()
        self._batcher_instances = instances
        if not was_started and old.queued:
            # requests that came while the first workers were being added wait in the
            # batcher made before there were any: run it until they are served
            old.start()
            was_started = True
        if was_started:
            self._spawn(self._drain(old))

    @staticmethod
    async def _drain(batcher: DynamicBatcher) -> None:
        while batcher.queued or batcher.in_flight:
            await asyncio.sleep(0.02)
        await batcher.stop()

    def _serviceable(self) -> bool:
        """Some worker serves or may yet (starting, or retried within maxRetryTimeoutInSec)."""
        if self._stopped:
            return False
        return self._starting > 0 or any(not s.gave_up for s in self._slots)

    async def _acquire(self) -> _Slot:
        while not self._idle:
            if not self._serviceable():
                raise service_unavailable(_no_worker_message(self.name))
            self._idle_event.clear()
            await self._idle_event.wait()
        slot = self._idle.popleft()
        slot.busy = True
        return slot

    def _release(self, slot: _Slot) -> None:
        slot.busy = False
        if slot.retired:
            self._spawn(self._stop_slot(slot))
            return
        if not slot.ready:  # it died running the batch: _keep_running restarts it
            return
        self._idle.append(slot)
        self._idle_event.set()

    async def _execute(self, jobs: list[tuple[RequestItem, float]]) -> list[Any]:
        slot = await self._acquire()
        started = time.monotonic()
        try:
            self.batch_sizes_seen = (self.batch_sizes_seen + [len(jobs)])[-64:]
            result: BatchResult = await slot.worker.execute(
                [item for item, _ in jobs], on_partial=self._route_partial
            )
        except WorkerTimeoutError as e:
            # TorchServe (WorkerThread): a worker that does not answer within responseTimeout
            # is taken for dead and restarted; its batch gets 500 "Worker died."
            err = internal(f"Worker died. Model {self.name}: {e}")
            return [Outcome(err, started - t) for _, t in jobs]
        except WorkerDiedError as e:
            # a worker killed by SIGKILL (the OOM killer, mostly) is 507, as TorchServe reads
            # its exit value 137
            code = 507 if e.exit_code == -signal.SIGKILL else 500
            # TorchServe's words first ("Worker died."), then which model and why
            message = f"Worker died. Model {self.name}: {e}"
            err = TSError(code, "InternalServerException", message)
            return [Outcome(err, started - t) for _, t in jobs]
        except WorkerError as e:
            err = internal(f"Model {self.name} worker error: {e}")
            return [Outcome(err, started - t) for _, t in jobs]
        finally:
            self._release(slot)
        if result.metrics and self.metrics_sink is not None:
            self.metrics_sink(result.metrics)
        if result.responses is None:
            # TorchServe's frontend (RestJob.sendError): the backend's code as the status (413
            # read as 507), the body an InternalServerException whatever the code; a handler's
            # PredictionException(message, error_code) gives its message as is
            code = _http_status(result.error_code)
            message = result.error_message
            if not result.handler_error:
                message = (f"Prediction failed for model {self.name} (version {self.version}): "
                           f"{message}")
            err = TSError(code, "InternalServerException", message)
            return [Outcome(err, started - t) for _, t in jobs]
        return [Outcome(r, started - t) for r, (_, t) in zip(result.responses, jobs)]

    def _route_partial(self, partial: PartialResponses) -> None:
        for request_id, response in partial.responses.items():
            consumer = self._streams.get(request_id)
            if consumer is not None:
                consumer(response)

    # -- requests --

    async def predict(
        self, item: RequestItem, on_partial: Callable[[ItemResponse], None] | None = None
    ) -> Outcome:
        """Queue one request; `on_partial` gets its intermediate responses, if any."""
        if not self._serviceable():
            raise service_unavailable(_no_worker_message(self.name))
        if on_partial is not None:
            self._streams[item.request_id] = on_partial
        try:
            return await self._batcher.submit((item, time.monotonic()))
        except QueueFullError as e:
            raise service_unavailable(
                f'Model "{self.name}" has no worker to serve inference request. {e}'
            ) from e
        except BatcherStoppedError as e:
            raise service_unavailable(f"Model {self.name} is being unloaded") from e
        finally:
            self._streams.pop(item.request_id, None)

    async def run_alone(self, item: RequestItem) -> Outcome:
        """Run one request in a batch of its own, bypassing the batcher.

        For requests whose handler mode is decided by a header of the *first* request of a
        batch (TorchServe's `explain` and `describe`): batched with ordinary predictions they
        would switch the whole batch's mode.
        """
        if not self._serviceable():
            raise service_unavailable(_no_worker_message(self.name))
        (outcome,) = await self._execute([(item, time.monotonic())])
        return outcome

    def describe(self) -> dict:
        """TorchServe's DescribeModelResponse, in its field order.

        The fields TorchServe 0.12 reports for features modelport has no notion of (parallel
        and sequence settings, job tickets, venvs) echo the archive's model-config YAML, with
        TorchServe's defaults where the YAML says nothing.
        """
        s = self.settings
        y = self.model_yaml
        doc: dict[str, Any] = {
            "modelName": self.name,
            "modelVersion": self.version,
            "modelUrl": self.url,
            "runtime": self.manifest.runtime,
            "minWorkers": s.min_workers,
            "maxWorkers": s.max_workers,
            "batchSize": s.batch_size,
            "maxBatchDelay": s.max_batch_delay_ms,
            "responseTimeout": int(s.response_timeout_s),
            "startupTimeout": _yaml_int(y, "startupTimeout", 120),
            "maxRetryTimeoutInSec": self.max_retry_timeout_s(),
            "clientTimeoutInMills": _yaml_int(y, "clientTimeoutInMills", 0),
        }
        level = _yaml_int(y, "parallelLevel", 0)
        ptype = str(y.get("parallelType") or "").lower()
        if level > 0 and ptype:
            doc.update(parallelType=ptype, parallelLevel=level)
        else:
            doc.update(parallelType="", parallelLevel=0)
        doc["deviceType"] = self._device_type()
        if isinstance(y.get("deviceIds"), list):
            doc["deviceIds"] = y["deviceIds"]
        seq = _yaml_int(y, "sequenceMaxIdleMSec", 0) > 0
        doc.update(
            continuousBatching=bool(y.get("continuousBatching", False)),
            useJobTicket=bool(y.get("useJobTicket", False)),
            useVenv=bool(y.get("useVenv", False)),
            stateful=bool(y.get("sequenceBatching", False)),
            sequenceMaxIdleMSec=_yaml_int(y, "sequenceMaxIdleMSec", 0) if seq else 0,
            sequenceTimeoutMSec=_yaml_int(y, "sequenceTimeoutMSec", 0),
            maxNumSequence=_yaml_int(y, "maxNumSequence", 0) if seq else 0,
            maxSequenceJobQueueSize=_yaml_int(y, "maxSequenceJobQueueSize", 0) if seq else 0,
            loadedAtStartup=self.loaded_at_startup,
        )
        # TorchServe 0.12 (ApiUtils.getModelDescription): READY when the worker has loaded
        # the model, else UNLOADING (starting, down, being retried, given up); the pid of its
        # latest process, -1 before it has one; startTime is the worker's, not its process's
        doc["workers"] = [
            {
                "id": slot.id,
                "startTime": slot.start_time,
                "status": "READY" if slot.ready and slot.worker.alive else "UNLOADING",
                "memoryUsage": _rss(slot.worker.pid) if slot.worker.alive else 0,
                "pid": slot.worker.pid or -1,
                "gpu": slot.gpu_id is not None,
                "gpuUsage": "N/A",
                # modelport's own, beyond TorchServe's fields
                "gpuId": slot.gpu_id,
                "restarts": slot.restarts,
            }
            for slot in self._slots
        ]
        doc["jobQueueStatus"] = {
            "remainingCapacity": max(s.job_queue_size - self._batcher.queued, 0),
            "pendingRequests": self._batcher.queued,
        }
        return doc

    def _device_type(self) -> str:
        """TorchServe's Model.deviceType: gpu when GPUs exist and the YAML does not ask for cpu."""
        if any(slot.gpu_id is not None for slot in self._slots):
            return "gpu"
        if str(self.model_yaml.get("deviceType", "")).lower() == "cpu" or self._slots:
            return "cpu"
        # no workers to tell: ask torch only if a scale-up already did (importing it is slow)
        return "gpu" if gpu_count.cache_info().currsize and self._visible_gpus() > 0 else "cpu"

    def healthy_workers(self) -> int:
        """Workers that serve, are starting, or are down for less than the YAML's
        maxRetryTimeoutInSec (default 300): TorchServe's WorkerThread.isHealthy, which gives a
        worker that long to come back before /ping counts it lost."""
        window = self.max_retry_timeout_s()
        now = time.monotonic()
        healthy = sum(
            1 for s in self._slots
            if s.down_since is None or (not s.gave_up and now - s.down_since < window)
        )  # fmt: skip
        return healthy + self._starting

    def healthy(self) -> bool:
        """TorchServe's ApiUtils.isModelHealthy for one version: at least minWorkers healthy."""
        return self.healthy_workers() >= self.settings.min_workers

    async def stop(self) -> None:
        self._stopped = True
        slots, self._slots = self._slots, []
        for slot in slots:
            slot.retired = True
            slot.died.set()
        self._idle.clear()
        self._idle_event.set()
        await self._batcher.stop()
        await asyncio.gather(*(self._stop_slot(s) for s in slots), return_exceptions=True)
        for t in list(self._retiring):
            with contextlib.suppress(BaseException):
                await t


def _retrieved(fut: asyncio.Future) -> None:
    """Marks a future's exception as seen: a worker's first start may fail unawaited."""
    if not fut.cancelled():
        fut.exception()


def _yaml_int(doc: dict, key: str, default: int) -> int:
    try:
        return int(doc.get(key, default))
    except (TypeError, ValueError):
        return default


def _rss(pid: int | None) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss) if pid else 0
    except Exception:
        return 0


@functools.cache
def gpu_count() -> int:
    """Visible CUDA devices; 0 when torch has no CUDA (the handler then runs on CPU)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _no_worker_message(name: str) -> str:
    return (
        f'Model "{name}" has no worker to serve inference request. '
        "Please use scale workers API to add workers."
    )


def _http_status(code: object) -> int:
    """A backend error code as TorchServe's frontend answers it: 413 becomes 507, and a code
    that is no HTTP status (or none) is 500."""
    if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
        return 500
    return 507 if code == 413 else code
