"""Before a device session: will each run_all.sh stage start on the GPU machine?

That machine has no network. Its python3 has the image's packages (gpu_image_packages.txt)
and the wheels carried in .whl/, which run_all.sh installs; nothing else. Device calls have
been lost to a package it lacks (fastapi 0.165's opentelemetry, msgspec, tritonclient). This
runs the stages' Python entry points here, on the CPU with a tiny model, in child processes
where importing any other installed third-party package fails as it would there: a
sitecustomize on PYTHONPATH hides those packages, also in the servers a stage starts.

    .venv/bin/python bench/gpu/preflight.py                  # wheels: .whl/'s, else WHEELS
    .venv/bin/python bench/gpu/preflight.py --wheels msgspec gguf --only w3 w1

Checks: the GPU test files collect; W3's latency, W1's throughput (ours, then HF transformers:
`hf`) and quant_decode's formats run a tiny dummy model; every bench/gpu script imports; W2's
server (w2_serve.py) serves a few streamed requests. Prints one line a check and, for a
failed one, the last lines of its output; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = Path(__file__).with_name("gpu_image_packages.txt")
# what a device session carries in .whl/ (../shared/tools/device-wheels.sh NAME ...): the HTTP
# stack for w2, msgspec (the engine's IPC) and gguf (GGUF files and dummy GGUF weights)
WHEELS = ("fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "uvicorn", "msgspec", "gguf", "opentelemetry-api", "sniffio",
          "xgrammar", "apache-tvm-ffi")
GPU_TESTS = ("test_gpu_attention.py", "test_gpu_engine.py", "test_gpu_features.py",
             "test_gpu_gemv.py",
             "test_gpu_piecewise.py", "test_quant_fp8_gpu.py", "test_quant_gpu.py",
             "test_quant_tools_gpu.py", "test_spec_decode.py", "test_tensor_parallel_gpu.py",
             "test_triton_offline.py", "test_spec_eagle.py", "test_spec_eagle3.py",
             "test_models_moe_more.py", "test_moe_quantized_cuda.py", "test_w4_gemv_half2.py")
# a Llama small enough for the CPU, with group-128 / block-64 friendly widths
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}

SITECUSTOMIZE = '''
import os, sys
_HIDDEN = frozenset(os.environ.get("MODELPORT_PREFLIGHT_HIDDEN", "").split(","))
class _NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(
                f"No module named {name!r} (not on the GPU machine: bench/gpu/preflight.py)",
                name=name)
        return None
sys.meta_path.insert(0, _NotOnTheGpuMachine())
# a probe (`importlib.util.find_spec("x") is not None`, as transformers' and kernels' checks
# do) answers None there, as it does where the package is absent, instead of raising
import importlib.util as _util
_find_spec = _util.find_spec
def _probe(name, package=None):
    full = _util.resolve_name(name, package) if name.startswith(".") else name
    return None if full.partition(".")[0] in _HIDDEN else _find_spec(name, package)
_util.find_spec = _probe
'''


def norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def image_packages() -> set[str]:
    lines = IMAGE.read_text().splitlines()
    return {norm(s) for s in (x.strip() for x in lines) if s and not s.startswith("#")}


def carried_wheels() -> tuple[str, ...]:
    """The distributions in .whl/ (a wheel's name is NAME-VERSION-...), else WHEELS."""
    found = sorted({p.name.split("-")[0] for p in (ROOT / ".whl").glob("*.whl")})
    return tuple(found) or WHEELS


def with_requirements(names: set[str]) -> set[str]:
    """names and, as installed here, everything they require (not extras): what the image
    needs for its own packages is there, whatever their versions here require."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    out, todo = set(names), list(names)
    while todo:
        try:
            reqs = requires(todo.pop()) or []
        except PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            if norm(r.name) not in out:
                out.add(norm(r.name))
                todo.append(norm(r.name))
    return out


def hidden_modules(allowed: set[str]) -> list[str]:
    """Top-level modules installed here whose distributions the GPU machine does not have."""
    from importlib.metadata import packages_distributions

    return sorted(top for top, dists in packages_distributions().items()
                  if top not in sys.stdlib_module_names
                  and not any(norm(d) in allowed for d in dists))


def checks(tmp: Path, port: int) -> dict[str, list[str]]:
    py = sys.executable
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    common = ["--model-config", str(cfg), "--load-format", "dummy", "--dtype", "bfloat16",
              "--max-model-len", "256", "--device", "cpu"]
    scripts = sorted(str(p) for p in (ROOT / "bench" / "gpu").glob("*.py")
                     if p.name != Path(__file__).name)
    scripts += [str(ROOT / "bench" / n) for n in ("quant_decode.py", "quant_gpu_linear.py")]
    w1 = [py, "-m", "modelport.bench.throughput", *common, "--num-prompts", "4",
          "--input-len-range", "16", "32", "--output-len-range", "2", "4"]
    imports = ("import runpy, sys\nfor p in sys.argv[1:]:\n"
               "    runpy.run_path(p, run_name='preflight')\n")
    return {
        "gpu-tests": [py, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                      "-p", "pytest_timeout",
                      *(str(ROOT / "tests" / t) for t in GPU_TESTS)],
        "w3": [py, "-m", "modelport.bench.latency", *common, "--batch-size", "1",
               "--input-len", "32", "--output-len", "4", "--num-iters", "1",
               "--num-iters-warmup", "0"],
        "w1": [*w1, "--backend", "modelport"],
        "hf": [*w1, "--backend", "hf", "--hf-num-prompts", "2"],  # hf-w1 (slow on a CPU)
        "quant-decode": [py, str(ROOT / "bench" / "quant_decode.py"), *common, "--formats",
                         "none", "awq", "gptq", "fp8", "bitsandbytes", "gguf-q4_k", "gguf-q8_0",
                         "--batch-sizes", "1", "--input-len", "16", "--output-len", "3",
                         "--num-iters", "1", "--num-iters-warmup", "0"],
        "scripts": [py, "-c", imports, *scripts],
        # s25-tests' structured outputs: xgrammar (carried) compiles a grammar there
        "grammar": [py, "-c", "from modelport.engine.structured_output import *\n"
                    "import xgrammar\nprint(xgrammar.Grammar.from_regex('[a-c]{4}'))"],
        "w2": [py, str(ROOT / "bench" / "gpu" / "w2_serve.py"), "--out", str(tmp / "w2"),
               "--model-config", str(cfg), "--rates", "inf", "--num-prompts", "6",
               "--input-len", "24", "--output-len", "4", "--port", str(port),
               "--ready-timeout", "240", "--", "--device", "cpu"],
    }


def run(only: list[str] | None, wheels: tuple[str, ...], port: int, timeout: float) -> int:
    allowed = with_requirements(image_packages()) | {norm(w) for w in wheels} | {"modelport"}
    hidden = hidden_modules(allowed)
    print(f"wheels: {' '.join(wheels)}\nhidden here (not on the GPU machine): {len(hidden)} "
          f"modules, e.g. {', '.join(hidden[:8])}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="preflight-") as t:
        tmp = Path(t)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {**os.environ, "MODELPORT_PREFLIGHT_HIDDEN": ",".join(hidden),
               "PYTHONPATH": os.pathsep.join([str(tmp / "site"), str(ROOT / "src")]),
               "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
               # the plugins installed here are not the image's (pytest-timeout is loaded
               # by name: pyproject's timeout setting needs it)
               "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        for name, argv in checks(tmp, port).items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            try:
                p = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                                   timeout=timeout)
                rc, out = p.returncode, p.stdout + p.stderr
            except subprocess.TimeoutExpired as e:
                rc, out = -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
            took = time.perf_counter() - t0
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {name} ({took:.0f} s)", flush=True)
            if rc:
                failed += 1
                print("\n".join("    " + x for x in str(out).strip().splitlines()[-12:]))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", nargs="*", default=None,
                    help="distributions carried as wheels (default: those in .whl/, else WHEELS)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these checks")
    ap.add_argument("--port", type=int, default=8047, help="w2's server port")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds a check")
    args = ap.parse_args(argv)
    wheels = tuple(args.wheels) if args.wheels is not None else carried_wheels()
    return run(args.only, wheels, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
