"""TorchServe workflows: a DAG of model archives and handler functions served as one endpoint.

Every DAG node becomes an ordinary registered model named `<workflow>__<node>`, as in
TorchServe, so nodes get the model registry's workers, batching, timeouts and error shapes:
a model node is its .mar (spec url, the spec's batch settings, max-workers workers); a
function node is the unpacked .war with the handler `<handler>:<function>` (one worker,
batch size 1). Running the DAG follows TorchServe's DagExecutor: the request's inputs go to
the start node; a node with one predecessor gets that node's output as the input "body"; a
node with several gets one input per predecessor, named after it; branches run
concurrently; each node is retried `retry-attempts` times and given `timeout-ms` per try.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from modelport.torchserve.archive import MANIFEST_PATH, unpack
from modelport.torchserve.errors import TSError, bad_request, conflict, internal
from modelport.torchserve.messages import InputParam, ItemResponse, RequestItem
from modelport.torchserve.registry import ModelRegistry, download_archive
from modelport.torchserve.workflow_archive import (
    NAME_RE,
    NodeSpec,
    WorkflowSpec,
    load_spec,
    read_war_manifest,
)

logger = logging.getLogger("modelport.torchserve")


def workflow_not_found(name: str) -> TSError:
    return TSError(404, "WorkflowNotFoundException", f"Workflow not found: {name}")


@dataclass
class Workflow:
    name: str
    url: str
    spec: WorkflowSpec
    war_dir: Path  # the unpacked archive (function nodes' model folder)

    def model_name(self, node: str) -> str:
        return f"{self.name}__{node}"

    def describe(self) -> dict[str, Any]:
        """TorchServe's DescribeWorkflowResponse (the spec's global settings)."""
        g = self.spec.globals
        return {
            "workflowName": self.name,
            "workflowUrl": self.url,
            "minWorkers": g["min-workers"],
            "maxWorkers": g["max-workers"],
            "batchSize": g["batch-size"],
            "maxBatchDelay": g["max-batch-delay"],
            "workflowDag": self.spec.dag_text,
        }


class WorkflowRegistry:
    """Registered workflows on top of the model registry. Runs on the server's event loop."""

    def __init__(
        self,
        models: ModelRegistry,
        workflow_store: Path | None,
        *,
        startup: tuple[tuple[str | None, str], ...] = (),
    ) -> None:
        self.models = models
        self.store = Path(workflow_store).resolve() if workflow_store else None
        self.startup = startup  # (name or None, url): loaded by load_startup()
        self._work_dir: Path | None = None  # made on first registration
        self._workflows: dict[str, Workflow] = {}
        self._pending: set[str] = set()

    def get(self, name: str) -> Workflow:
        wf = self._workflows.get(name)
        if wf is None:
            raise workflow_not_found(name)
        return wf

    def names(self) -> list[str]:
        return sorted(self._workflows)

    # -- archives --

    def resolve_url(self, url: str, trusted: bool = False) -> Path:
        """A .war in the workflow store, a local path the operator named (`trusted`) or one
        matching allowed_urls, or an http(s) URL matching allowed_urls (downloaded)."""
        if not url or not url.strip():
            raise bad_request("Parameter url is required.")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if not any(p.fullmatch(url) for p in self.models.allowed_urls):
                raise workflow_not_found_url(url, "does not match any allowed URL(s)")
            return self._download(url)
        if scheme not in ("", "file"):
            raise bad_request(f"Invalid workflow url: {url}")
        raw = Path(unquote(parts.path) if scheme == "file" else url)
        if trusted:
            for cand in ([self.store / raw] if self.store else []) + [raw]:
                if cand.exists():
                    return cand.resolve()
            raise workflow_not_found_url(url, "not found")
        if ".." in raw.parts:
            raise workflow_not_found_url(url, "relative path is not allowed")
        if not raw.is_absolute():
            if self.store is None or not (self.store / raw).exists():
                raise workflow_not_found_url(url, "not found in the workflow store")
            return (self.store / raw).resolve()
        resolved = raw.resolve()
        in_store = self.store is not None and self.store in resolved.parents
        allowed = any(p.fullmatch(f"file://{resolved}") for p in self.models.allowed_urls)
        if not (in_store or allowed):
            raise workflow_not_found_url(url, "does not match any allowed URL(s)")
        if not resolved.exists():
            raise workflow_not_found_url(url, "not found")
        return resolved

    def _download(self, url: str) -> Path:
        if self.store is None:
            raise bad_request("Cannot download a workflow archive without a workflow store")
        name = Path(unquote(urlsplit(url).path)).name
        if not name.endswith(".war"):
            raise bad_request(f"Invalid workflow url: {url} (does not name a .war)")
        target = self.store / name
        if target.exists():
            raise conflict(f"Workflow file {name} already exists in workflow store")
        return download_archive(url, target, "Failed to download workflow archive")

    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="modelport-wf-"))
        return self._work_dir

    def _open(self, src: Path) -> Path:
        dest = self.work_dir / uuid.uuid4().hex
        if src.is_dir():  # never write the MAR-INF manifest into the user's folder
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
            return dest
        return unpack(src, dest)

    # -- registration --

    async def register(
        self,
        url: str,
        name: str | None = None,
        *,
        response_timeout: int | None = None,
        trusted: bool = False,
    ) -> Workflow:
        src = await asyncio.to_thread(self.resolve_url, url, trusted)
        war_dir = await asyncio.to_thread(self._open, src)
        try:
            manifest = read_war_manifest(war_dir)
            name = name or manifest.workflow_name
            if not NAME_RE.fullmatch(name):
                raise bad_request(f"Invalid workflow name: {name!r}")
            if name in self._workflows or name in self._pending:
                raise conflict(f"Workflow {name} is already registered.")
            spec = await asyncio.to_thread(load_spec, war_dir, manifest)
        except BaseException:
            shutil.rmtree(war_dir, ignore_errors=True)
            raise
        wf = Workflow(name, url, spec, war_dir)
        self._pending.add(name)
        try:
            await self._register_nodes(wf, manifest.handler, response_timeout)
            self._workflows[name] = wf
        except BaseException:
            shutil.rmtree(war_dir, ignore_errors=True)
            raise
        finally:
            self._pending.discard(name)
        return wf

    async def _register_nodes(
        self, wf: Workflow, handler: str, response_timeout: int | None
    ) -> None:
        if any(n.is_function for n in wf.spec.nodes.values()):
            _write_function_manifest(wf.war_dir, wf.name, handler)
        module = Path(handler).stem
        nodes = list(wf.spec.nodes.values())
        results = await asyncio.gather(
            *(self._register_node(wf, n, module, response_timeout) for n in nodes),
            return_exceptions=True,
        )
        failures = [
            f"Workflow Node {wf.model_name(n.name)} failed to register. Details: {_message(r)}"
            for n, r in zip(nodes, results)
            if isinstance(r, BaseException)
        ]
        if failures:
            ok = [n for n, r in zip(nodes, results) if not isinstance(r, BaseException)]
            await self._unregister_models(wf, ok)
            raise TSError(
                500,
                "WorkflowException",
                f"Workflow {wf.name} has failed to register. Failures: [{', '.join(failures)}]",
            )

    async def _register_node(
        self, wf: Workflow, node: NodeSpec, module: str, response_timeout: int | None
    ) -> None:
        overrides: dict[str, Any] = {
            "batch_size": node.batch_size,
            "max_batch_delay_ms": node.max_batch_delay_ms,
        }
        if response_timeout is not None:
            overrides["response_timeout_s"] = response_timeout
        # TorchServe (WorkflowManager.registerModelWrapper) starts max-workers workers
        if node.is_function:
            await self.models.register(
                str(wf.war_dir),
                model_name=wf.model_name(node.name),
                handler=f"{module}:{node.name}",
                overrides=overrides,
                initial_workers=1,
                trusted=True,
            )
        else:
            assert node.url is not None
            await self.models.register(
                node.url,
                model_name=wf.model_name(node.name),
                overrides=overrides,
                initial_workers=node.max_workers,
            )

    async def _unregister_models(self, wf: Workflow, nodes: list[NodeSpec]) -> None:
        async def one(node: NodeSpec) -> None:
            try:
                await self.models.unregister(wf.model_name(node.name))
            except TSError as e:
                if e.code != 404:
                    raise

        results = await asyncio.gather(*(one(n) for n in nodes), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                logger.error("unregistering a node of workflow %s failed: %s", wf.name, r)

    async def unregister(self, name: str) -> Workflow:
        wf = self._workflows.pop(name, None)
        if wf is None:
            raise workflow_not_found(name)
        await self._unregister_models(wf, list(wf.spec.nodes.values()))
        shutil.rmtree(wf.war_dir, ignore_errors=True)
        return wf

    async def load_startup(self) -> None:
        for name, url in self.startup:
            wf = await self.register(url, name, trusted=True)
            logger.info("loaded TorchServe workflow %s", wf.name)

    async def stop(self) -> None:
        for name in list(self._workflows):
            try:
                await self.unregister(name)
            except Exception as e:  # shutting down: log and go on
                logger.error("unregistering workflow %s failed: %s", name, e)
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    # -- inference --

    async def predict(self, name: str, item: RequestItem) -> ItemResponse:
        """Run the DAG for one request; the leaf's output is the answer (several leaves: a
        JSON object keyed by leaf name, as TorchServe's WorkflowManager.predict)."""
        wf = self.get(name)
        spec = wf.spec
        inputs: dict[str, list[InputParam]] = {spec.start: list(item.params)}
        waiting = {n: len(p) for n, p in spec.predecessors.items()}
        ready, running = [spec.start], {}
        leaves: list[tuple[str, ItemResponse]] = []
        try:
            while ready or running:
                for node in ready:
                    req = RequestItem(uuid.uuid4().hex, inputs.pop(node), item.headers)
                    running[asyncio.ensure_future(self._invoke(wf, node, req))] = node
                ready = []
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node = running.pop(task)
                    out = task.result()  # a failed node fails the request
                    if not spec.successors[node]:
                        leaves.append((node, out))
                    for nxt in spec.successors[node]:
                        one = len(spec.predecessors[nxt]) == 1
                        param = InputParam("body" if one else node, "", out.body)
                        inputs.setdefault(nxt, []).append(param)
                        waiting[nxt] -= 1
                        if waiting[nxt] == 0:
                            ready.append(nxt)
        finally:
            for task in running:  # a node failed: stop its siblings, collect their errors
                if task.done() and not task.cancelled():
                    task.exception()
                task.cancel()
        if len(leaves) == 1:
            return ItemResponse(200, leaves[0][1].body, "application/json")
        doc = {node: _json_or_text(out.body) for node, out in sorted(leaves)}
        return ItemResponse(200, json.dumps(doc).encode(), "application/json")

    async def _invoke(self, wf: Workflow, node: str, item: RequestItem) -> ItemResponse:
        spec = wf.spec.nodes[node]
        attempts = spec.retry_attempts + 1
        last = ""
        for attempt in range(attempts):
            try:
                mv = self.models.get(wf.model_name(node))
                outcome = await asyncio.wait_for(
                    mv.predict(replace(item, request_id=uuid.uuid4().hex)),
                    spec.timeout_ms / 1000,
                )
                if not isinstance(outcome.response, TSError):
                    return outcome.response
                last = outcome.response.message
            except TimeoutError:
                last = f"timed out after {spec.timeout_ms} ms"
            except TSError as e:
                last = e.message
            logger.warning(
                "workflow %s node %s failed (attempt %d of %d): %s",
                wf.name, node, attempt + 1, attempts, last,
            )  # fmt: skip
        raise internal(f"Error executing {node} after {attempts} attempts: {last}")


def workflow_not_found_url(url: str, why: str) -> TSError:
    return TSError(404, "WorkflowNotFoundException", f"Workflow archive {url}: {why}")


def _write_function_manifest(war_dir: Path, name: str, handler: str) -> None:
    """Function nodes are served as models of the unpacked .war: give it a MAR manifest."""
    if not handler:
        raise bad_request(f"workflow {name} has function nodes but no handler file")
    path = war_dir / MANIFEST_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "runtime": "python",
        "model": {"modelName": name, "modelVersion": "1.0", "handler": handler},
        "archiverVersion": "modelport-workflow",
    }
    path.write_text(json.dumps(doc, indent=2))


def _message(e: BaseException) -> str:
    text = e.message if isinstance(e, TSError) else f"{type(e).__name__}: {e}"
    return re.sub(r"\s+", " ", text).strip()


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
