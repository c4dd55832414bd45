"""`modelport bench <kind>`: each kind is a module `modelport.bench.<kind>` with
`add_args(parser)` and `run(args) -> int`, so benchmarks are added without touching this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

KNOWN_KINDS = ("serve", "throughput", "latency")


def _kinds() -> list[str]:
    """Known kinds first, then any other module in modelport.bench (import-free discovery)."""
    try:
        import modelport.bench as pkg
    except ModuleNotFoundError:
        return []
    found = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
    return [k for k in KNOWN_KINDS if k in found] + sorted(found - set(KNOWN_KINDS))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: serve (online), throughput, latency (offline)")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    for kind in _kinds():
        mod = importlib.import_module(f"modelport.bench.{kind}")
        if not (hasattr(mod, "add_args") and hasattr(mod, "run")):
            continue
        doc = (mod.__doc__ or "").strip().splitlines()
        kp = kinds.add_parser(kind, help=doc[0] if doc else kind, description=mod.__doc__)
        mod.add_args(kp)
        kp.set_defaults(func=mod.run)
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])
