"""`modelport workflow-archive`: torch-workflow-archiver's command, for when it is not installed.

Same flags and the same .war layout (spec, handler and extra files at the root,
WAR-INF/MANIFEST.json), so archives made here serve on TorchServe too and vice versa.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "workflow-archive",
        help="package a TorchServe workflow (.war), as torch-workflow-archiver does",
        description="Package a workflow spec YAML, its handler .py and extra files into "
        "<workflow-name>.war for `modelport serve --workflow-store` / POST /workflows.",
    )
    p.add_argument("--workflow-name", required=True, help="archive name: <name>.war")
    p.add_argument("--spec-file", required=True, help="workflow specification (.yaml)")
    p.add_argument("--handler", default=None, help="python file with the DAG's functions")
    p.add_argument("--export-path", default=os.getcwd(), help="folder to write the .war into")
    p.add_argument(
        "--extra-files", default=None, help="comma-separated files or folders to include"
    )
    p.add_argument(
        "-f", "--force", action="store_true", help="overwrite an existing .war of that name"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modelport.torchserve.workflow_archive import WorkflowArchiverError, create_war

    extra = [Path(x.strip()) for x in (args.extra_files or "").split(",") if x.strip()]
    try:
        out = create_war(
            args.workflow_name,
            Path(args.spec_file),
            Path(args.handler) if args.handler else None,
            Path(args.export_path),
            extra,
            args.force,
        )
    except WorkflowArchiverError as e:
        print(f"modelport workflow-archive: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
