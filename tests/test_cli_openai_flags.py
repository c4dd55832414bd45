"""`modelport serve` and the api_server module take the same vLLM-named flags; `wants()` picks
the OpenAI frontend for --model or when no other frontend is asked for."""

from __future__ import annotations

import argparse

import pytest

from modelport.entrypoints.cli import build_parser
from modelport.entrypoints.openai import frontend
from modelport.entrypoints.openai.api_server import engine_args_from, make_parser

FLAGS = [
    "--model", "/models/llama", "--port", "8001", "--tensor-parallel-size", "1",
    "--gpu-memory-utilization", "0.8", "--max-model-len", "8192", "--enable-prefix-caching",
    "--served-model-name", "llama", "alias", "--api-key", "k", "--max-num-seqs", "4",
    "--max-num-batched-tokens", "64", "--enforce-eager", "--load-format", "dummy",
    "--kv-cache-memory", "1GiB", "--dtype", "float32", "--max-waiting-requests", "9",
    "--seed", "5", "--block-size", "32", "--pipeline-parallel-size", "1",
]  # fmt: skip


@pytest.mark.parametrize("form", ["serve", "api_server"])
def test_same_vllm_flags_in_both_launch_forms(form: str) -> None:
    if form == "serve":
        args = build_parser().parse_args(["serve", *FLAGS])
    else:
        args = make_parser().parse_args(FLAGS)
    assert args.port == 8001 and args.api_key == ["k"]
    assert args.served_model_name == ["llama", "alias"]
    ea = engine_args_from(args)
    assert ea.model == "/models/llama" and ea.served_model_name == "llama"
    assert ea.max_model_len == 8192 and ea.gpu_memory_utilization == 0.8
    assert ea.max_num_seqs == 4 and ea.max_num_batched_tokens == 64
    assert ea.enforce_eager and ea.enable_prefix_caching and ea.load_format == "dummy"
    assert ea.kv_cache_memory == 1 << 30 and ea.dtype == "float32"
    assert ea.max_waiting_requests == 9 and ea.seed == 5 and ea.block_size == 32
    assert ea.pipeline_parallel_size == 1


def test_pipeline_parallelism_is_refused_naming_the_alternatives() -> None:
    """vLLM's --pipeline-parallel-size / -pp parses (1 runs as usual); more than 1 is a clear
    error, raised before any model is read, naming tensor and data parallelism."""
    from modelport.engine.arg_utils import EngineArgs

    args = build_parser().parse_args(["serve", "-pp", "2", "--model", "/nowhere"])
    ea = engine_args_from(args)
    assert ea.pipeline_parallel_size == 2
    with pytest.raises(ValueError, match="pipeline parallelism is not implemented") as e:
        ea.create_engine_config()
    assert "--tensor-parallel-size" in str(e.value) and "--data-parallel-size" in str(e.value)
    with pytest.raises(ValueError, match="pipeline_parallel_size 4"):
        EngineArgs(model="/nowhere", pipeline_parallel_size=4).create_engine_config()
    from modelport import LLM

    with pytest.raises(ValueError, match="pipeline_parallel_size 2"):
        LLM("/nowhere", pipeline_parallel_size=2)


def test_wants_default_model_unless_another_frontend_is_asked_for() -> None:
    ns = argparse.Namespace
    assert frontend.wants(ns(model=None))  # `modelport serve`: the embedded default
    assert frontend.wants(ns(model="/m", model_repository="/repo"))
    # a repository alone: /v1 routes for its `llm` models, but no default LLM of our own
    assert frontend.wants(ns(model=None, model_repository="/repo"))
    assert not frontend._own_engine(ns(model=None, model_repository="/repo"))
    assert frontend._own_engine(ns(model="/m", model_repository="/repo"))
    assert not frontend.wants(ns(model=None, model_store="/store", models=["a.mar"]))
    assert not frontend.wants(ns(model=None, ts_config="config.properties"))


def test_bad_flag_values_are_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-memory", "lots"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "eighty"])


def _without_package(monkeypatch: pytest.MonkeyPatch, frontend_module: str, package: str) -> None:
    """Importing frontend_module fails as it does where `package` is not installed."""
    from modelport.entrypoints import cli_serve

    real = cli_serve.importlib.import_module

    def fake(name: str, *a, **kw):  # noqa: ANN202
        if name == frontend_module:
            raise ModuleNotFoundError(f"No module named '{package}'", name=package)
        return real(name, *a, **kw)

    monkeypatch.setattr(cli_serve.importlib, "import_module", fake)
    monkeypatch.setattr(cli_serve, "UNAVAILABLE", {})


def test_a_frontend_whose_package_is_missing_is_left_out_and_named(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # the GPU image has no tritonclient: `modelport serve --model ...` must still start
    from modelport.entrypoints import cli
    from modelport.entrypoints.cli_serve import FRONTENDS

    kserve = next(f for f in FRONTENDS if ".kserve." in f)
    _without_package(monkeypatch, kserve, "tritonclient")
    args = build_parser().parse_args(["serve", "--model", "/m", "--port", "8002"])
    assert args.model == "/m" and args.port == 8002
    assert "kserve frontend off" in args.unrecognized_hint
    assert "'tritonclient'" in args.unrecognized_hint
    # its own flags are unknown now: the error says why instead of a bare "unrecognized"
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--model-repository", "/repo"])  # (/repo: serve's MODEL)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --model-repository" in err
    assert "kserve frontend off" in err and "tritonclient" in err


def test_a_missing_module_of_modelport_itself_is_not_hidden(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from modelport.entrypoints.cli_serve import FRONTENDS

    _without_package(monkeypatch, FRONTENDS[1], "modelport.entrypoints.kserve.gone")
    with pytest.raises(ModuleNotFoundError):
        build_parser()


def test_every_frontend_imports_in_the_test_environment() -> None:
    from modelport.entrypoints import cli_serve

    args = build_parser().parse_args(["serve"])
    assert args.unrecognized_hint == "" and cli_serve.UNAVAILABLE == {}


@pytest.mark.parametrize(
    ("argv", "source_name", "expected"),
    [
        # vLLM's default name is the --model string as given; the folder name stays served
        (["--model", "./tiny"], "tiny", ["./tiny", "tiny"]),
        (["--model", "/models/llama/"], "llama", ["/models/llama/", "llama"]),
        (["--model", "m.Q4_0.gguf"], "m.Q4_0", ["m.Q4_0.gguf", "m.Q4_0"]),
        (["--model", "org/name"], "org/name", ["org/name"]),  # a cached repo id: one name
        ([], "SmolLM2-135M-Instruct", ["SmolLM2-135M-Instruct"]),  # the embedded default
        (["--model", "./tiny", "--served-model-name", "a", "b"], "tiny", ["a", "b"]),
    ],
)
def test_served_names_default_to_the_model_string_and_its_folder_name(
    argv: list[str], source_name: str, expected: list[str]
) -> None:
    from modelport.entrypoints.openai.api_server import served_names

    for args in (build_parser().parse_args(["serve", *argv]), make_parser().parse_args(argv)):
        assert served_names(args, source_name) == expected
        # the engine config's name is the first served name (None: the loader's name)
        first = expected[0] if argv else None
        assert engine_args_from(args).served_model_name == first


@pytest.mark.parametrize("form", ["serve", "api_server"])
def test_default_chat_template_kwargs_flag(form: str) -> None:
    def parse(*argv: str) -> argparse.Namespace:
        if form == "serve":
            return build_parser().parse_args(["serve", *argv])
        return make_parser().parse_args(list(argv))

    flag = "--default-chat-template-kwargs"
    assert parse(flag, '{"enable_thinking": false}').default_chat_template_kwargs == {
        "enable_thinking": False}
    assert parse().default_chat_template_kwargs is None
    for bad in ("{enable_thinking: false}", "[1]", "true"):  # not JSON, not an object
        with pytest.raises(SystemExit):
            parse(flag, bad)


def test_serve_takes_the_model_as_vllm_serve_does() -> None:
    """`modelport serve MODEL ...` as `vllm serve MODEL ...`: the same as --model."""
    from modelport.entrypoints.cli_serve import take_model_tag

    args = build_parser().parse_args(["serve", "/models/llama", "--max-model-len", "8k"])
    take_model_tag(args)
    ea = engine_args_from(args)
    assert ea.model == "/models/llama" and ea.max_model_len == 8000
    assert frontend.wants(args)
    same = build_parser().parse_args(["serve", "/m", "--model", "/m"])
    take_model_tag(same)
    assert same.model == "/m"
    both = build_parser().parse_args(["serve", "/a", "--model", "/b"])
    with pytest.raises(SystemExit, match="given twice"):
        take_model_tag(both)
    plain = build_parser().parse_args(["serve"])
    take_model_tag(plain)
    assert plain.model is None  # the embedded default, as before
