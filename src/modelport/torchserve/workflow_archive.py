"""TorchServe workflow archives (.war) and their workflow specification.

A .war is a zip holding the spec YAML, a handler .py whose top-level functions are the
DAG's function nodes, any extra files, and WAR-INF/MANIFEST.json as torch-workflow-archiver
writes it (`{"createdOn", "workflow": {"workflowName", "specFile", "handler"},
"archiverVersion"}`). The spec is parsed and its DAG checked here, before anything is
registered, so a bad archive costs no worker process.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from modelport.torchserve.errors import TSError

logger = logging.getLogger("modelport.torchserve")

WAR_MANIFEST = "WAR-INF/MANIFEST.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]*")
ARCHIVER_VERSION = "0.2.15"  # torch-workflow-archiver's version that this layout matches

# TorchServe's WorkFlow defaults for keys the spec's `models:` section leaves out
_GLOBAL_DEFAULTS = {
    "min-workers": 1,
    "max-workers": 1,
    "batch-size": 1,
    "max-batch-delay": 50,
    "retry-attempts": 1,
    "timeout-ms": 10000,
}


def invalid_workflow(message: str) -> TSError:
    return TSError(400, "InvalidWorkflowException", message)


def invalid_dag(message: str) -> TSError:
    return TSError(400, "InvalidDAGException", message)


@dataclass(frozen=True)
class WarManifest:
    workflow_name: str
    spec_file: str
    handler: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


def read_war_manifest(war_dir: Path) -> WarManifest:
    path = war_dir / WAR_MANIFEST
    if not path.is_file():
        raise invalid_workflow(f"{WAR_MANIFEST} not found in the workflow archive")
    try:
        raw = json.loads(path.read_text())
        wf = raw["workflow"]
        name, spec = str(wf["workflowName"]), str(wf["specFile"])
    except (ValueError, KeyError, TypeError) as e:
        raise invalid_workflow(f"malformed {WAR_MANIFEST}: {e}") from e
    return WarManifest(name, spec, str(wf.get("handler") or ""), raw)


@dataclass(frozen=True)
class NodeSpec:
    """One DAG node: a model archive (`url` set) or a function of the handler file."""

    name: str
    url: str | None
    min_workers: int
    max_workers: int
    batch_size: int
    max_batch_delay_ms: int
    retry_attempts: int
    timeout_ms: int

    @property
    def is_function(self) -> bool:
        return self.url is None


@dataclass(frozen=True)
class WorkflowSpec:
    """A checked spec: one start node, no cycle, every node known."""

    nodes: dict[str, NodeSpec]  # in the order the DAG names them
    successors: dict[str, tuple[str, ...]]
    predecessors: dict[str, tuple[str, ...]]
    start: str
    globals: dict[str, int]
    dag_text: str  # the `dag:` section as TorchServe's describe prints it (a Java Map)

    @property
    def leaves(self) -> list[str]:
        return [n for n in self.nodes if not self.successors[n]]


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_workflow(f"{where} must be an integer, got {value!r}")
    return value


def _java_map(dag: dict) -> str:
    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(str(x) for x in v) + "]"
        return "null" if v is None else str(v)

    return "{" + ", ".join(f"{k}={value(v)}" for k, v in dag.items()) + "}"


def parse_spec(doc: Any, functions: set[str] | None) -> WorkflowSpec:
    """Build and check the DAG of a spec document (the YAML, loaded).

    `functions` are the handler file's top-level function names (None: no handler file). As
    in TorchServe, only nodes named in `dag:` are served; a node that is no entry of
    `models:` is a function node (one worker, batch size 1, no batch delay).
    """
    if not isinstance(doc, dict):
        raise invalid_workflow("the workflow specification must be a YAML mapping")
    models, dag = doc.get("models") or {}, doc.get("dag")
    if not isinstance(models, dict):
        raise invalid_workflow("`models` must be a mapping")
    if not isinstance(dag, dict) or not dag:
        raise invalid_workflow("the workflow specification has no `dag`")
    g = dict(_GLOBAL_DEFAULTS)
    per_model: dict[str, dict] = {}
    for key, value in models.items():
        if key in g:
            g[key] = _int(value, f"models.{key}")
        elif isinstance(value, dict):
            per_model[str(key)] = value
        else:
            raise invalid_workflow(f"models.{key} must be a mapping with a url")

    def node(name: str) -> NodeSpec:
        m = per_model.get(name)
        if m is None:
            if functions is None:
                raise invalid_workflow(
                    f"DAG node {name!r} is no model of the spec and the archive has no handler"
                )
            if name not in functions:
                raise invalid_workflow(
                    f"DAG node {name!r} is neither a model of the spec nor a function of the "
                    "workflow handler"
                )
            return NodeSpec(name, None, 1, 1, 1, 0, g["retry-attempts"], g["timeout-ms"])
        url = m.get("url")
        if not isinstance(url, str) or not url.strip():
            raise invalid_workflow(f"model {name!r} of the workflow specification has no url")
        vals = {k: _int(m.get(k, g[k]), f"models.{name}.{k}") for k in g}
        return NodeSpec(name, url, *(vals[k] for k in _GLOBAL_DEFAULTS))

    successors: dict[str, list[str]] = {}
    for src, targets in dag.items():
        src = str(src)
        if targets is not None and not isinstance(targets, list):
            raise invalid_workflow(f"dag.{src} must be a list of node names")
        successors.setdefault(src, [])
        for t in targets or []:
            if t is None or not str(t).strip():
                continue
            t = str(t)
            if t == src:
                raise invalid_dag("Self loop exception")
            if t not in successors[src]:
                successors[src].append(t)
            successors.setdefault(t, [])
    for name in successors:
        if not NAME_RE.fullmatch(name):
            raise invalid_workflow(f"Invalid DAG node name: {name!r}")
    predecessors: dict[str, list[str]] = {n: [] for n in successors}
    for src, targets in successors.items():
        for t in targets:
            predecessors[t].append(src)
    starts = [n for n, p in predecessors.items() if not p]
    if len(starts) != 1:
        raise invalid_dag("DAG should have only one start node")
    _check_acyclic(successors, predecessors)
    return WorkflowSpec(
        nodes={n: node(n) for n in successors},
        successors={n: tuple(v) for n, v in successors.items()},
        predecessors={n: tuple(v) for n, v in predecessors.items()},
        start=starts[0],
        globals=g,
        dag_text=_java_map(dag),
    )


def _check_acyclic(successors: dict[str, list[str]], predecessors: dict[str, list[str]]) -> None:
    indegree = {n: len(p) for n, p in predecessors.items()}
    ready = [n for n, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        n = ready.pop()
        seen += 1
        for t in successors[n]:
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    if seen != len(successors):
        raise invalid_dag("Not a valid DAG")


def handler_functions(path: Path) -> set[str]:
    """Top-level function names of the workflow handler, read without importing it (the
    server process never runs user code; the function nodes' workers do)."""
    try:
        tree = ast.parse(path.read_text(), filename=path.name)
    except (OSError, SyntaxError, ValueError) as e:
        raise invalid_workflow(f"cannot read workflow handler {path.name}: {e}") from e
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def load_spec(war_dir: Path, manifest: WarManifest) -> WorkflowSpec:
    import yaml

    spec_path = war_dir / manifest.spec_file
    if not manifest.spec_file or not spec_path.is_file():
        raise invalid_workflow(f"spec file {manifest.spec_file!r} not found in the archive")
    try:
        doc = yaml.safe_load(spec_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise invalid_workflow(f"Failed to parse yaml: {e}") from e
    handler = war_dir / manifest.handler if manifest.handler else None
    if handler is not None and not handler.is_file():
        raise invalid_workflow(f"handler {manifest.handler!r} not found in the archive")
    return parse_spec(doc, handler_functions(handler) if handler else None)


# -- creating archives (what torch-workflow-archiver does) --


class WorkflowArchiverError(Exception):
    pass


def create_war(
    workflow_name: str,
    spec_file: Path,
    handler: Path | None,
    export_path: Path,
    extra_files: list[Path] = (),  # type: ignore[assignment]
    force: bool = False,
) -> Path:
    """Write `<export_path>/<workflow_name>.war` the way torch-workflow-archiver does."""
    if not NAME_RE.fullmatch(workflow_name):
        raise WorkflowArchiverError(
            "Workflow name contains special characters.\nThe allowed regular expression "
            "filter for workflow name is: ^[A-Za-z0-9][A-Za-z0-9_\\-.]*$"
        )
    if not export_path.is_dir():
        raise WorkflowArchiverError(
            f"Given export-path {export_path} is not a directory. "
            "Point to a valid export-path directory."
        )
    target = export_path / f"{workflow_name}.war"
    if target.exists() and not force:
        raise WorkflowArchiverError(
            f"{target} already exists.\nPlease specify --force/-f option to overwrite the "
            "workflow archive output file.\nSee -h/--help for more details."
        )
    for p in [spec_file, *([handler] if handler else []), *extra_files]:
        if not p.exists():
            raise WorkflowArchiverError(f"{p} not found")
    manifest = {
        "createdOn": datetime.now().strftime("%d/%m/%Y %H:%M:%S"),
        "workflow": {
            "workflowName": workflow_name,
            "specFile": spec_file.name,
            "handler": handler.name if handler else "",
        },
        "archiverVersion": ARCHIVER_VERSION,
    }
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in [spec_file, *([handler] if handler else []), *extra_files]:
            if p.is_dir():
                for f in sorted(p.rglob("*")):
                    skip = {"__pycache__", "__MACOSX"} & set(f.parts) or any(
                        part.startswith(".") for part in f.relative_to(p).parts
                    )
                    if f.is_file() and not skip:
                        z.write(f, f.relative_to(p).as_posix())
            else:
                z.write(p, p.name)
        z.writestr(WAR_MANIFEST, json.dumps(manifest, indent=2))
    shutil.move(tmp, target)
    return target
