"""`modelport` command line. Each subcommand lives in its own module with register(subparsers)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining register(subparsers) that sets func=callable(args) -> int
_SUBCOMMANDS = {
    "serve": "modelport.entrypoints.cli_serve",
    "generate": "modelport.entrypoints.cli_generate",
    "plan": "modelport.entrypoints.cli_plan",
    "bench": "modelport.entrypoints.cli_bench",
    "quantize": "modelport.entrypoints.cli_quantize",
    "eval": "modelport.entrypoints.cli_eval",
    "run-batch": "modelport.entrypoints.openai.run_batch",
    "workflow-archive": "modelport.entrypoints.cli_workflow_archive",
}


def build_parser() -> argparse.ArgumentParser:
    from modelport.entrypoints.vllm_compat import ConfigFileParser

    # serve's `--config FILE` (vLLM's YAML of flags); subparsers are of the same class
    parser = ConfigFileParser(
        prog="modelport", description="Deploy LLMs and other models behind standard APIs."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # not built yet
        mod.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelport")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # a subcommand may know why (serve: a frontend whose package is missing)
        hint = getattr(args, "unrecognized_hint", "")
        parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({hint})" if hint else ""))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # serve --start relaunches it
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: servers have shut down in order by now
        return 130
    except BrokenPipeError:  # `modelport plan ... | head`: the reader left; say nothing more
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is silent
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
