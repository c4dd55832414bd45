"""vLLM `serve` flags carried over from launch scripts (entrypoints/vllm_compat.py): each parses
in both launch forms, the served ones do what vLLM's do, the others are accepted where
modelport already behaves so, or refused at start-up, never at vLLM's default value."""

from __future__ import annotations

import argparse
import types

import pytest
from starlette.testclient import TestClient

from modelport.entrypoints import vllm_compat
from modelport.entrypoints.cli import build_parser
from modelport.entrypoints.cli_serve import take_model_tag
from modelport.entrypoints.openai.api_server import build_app, engine_args_from, make_parser

# every flag, with a value vLLM takes (the refused ones at a value that is refused later)
FLAGS: list[list[str]] = [
    ["--download-dir", "/tmp/hf"], ["--tokenizer-mode", "auto"], ["--swap-space", "4"],
    ["--disable-log-requests"], ["--enable-log-requests"], ["--enable-chunked-prefill"],
    ["--no-enable-chunked-prefill"], ["--response-role", "assistant"],
    ["--uvicorn-log-level", "warning"], ["--disable-log-stats"],
    ["--distributed-executor-backend", "mp"], ["--max-seq-len-to-capture", "8192"],
    ["--cpu-offload-gb", "0"], ["--revision", "main"], ["--code-revision", "main"],
    ["--tokenizer-revision", "main"], ["--allowed-origins", '["*"]'],
    ["--allowed-methods", '["GET", "POST"]'], ["--allowed-headers", '["*"]'],
    ["--allow-credentials"], ["--root-path", "/api"], ["--ssl-keyfile", "k.pem"],
    ["--ssl-certfile", "c.pem"], ["--max-log-len", "100"], ["--scheduling-policy", "fcfs"],
    ["--generation-config", "auto"], ["--override-generation-config", '{"temperature": 0.5}'],
    ["--compilation-config", '{"level": 3}'], ["-O", "3"], ["-O3"], ["--cuda-graph-sizes", "512"],
    ["--cuda-graph-sizes", "64"],
    ["--num-gpu-blocks-override", "100"], ["--limit-mm-per-prompt", '{"image": 2}'],
    ["--enable-sleep-mode"], ["--disable-custom-all-reduce"],
    ["--disable-frontend-multiprocessing"], ["--enable-request-id-headers"],
    ["--return-tokens-as-token-ids"], ["--enable-prompt-tokens-details"],
    ["--enable-force-include-usage"], ["--max-num-partial-prefills", "1"],
    ["--guided-decoding-backend", "xgrammar"], ["--lora-dtype", "auto"],
    ["--long-lora-scaling-factors", "4.0"], ["--fully-sharded-loras"],
    ["--enable-expert-parallel"], ["--chat-template-content-format", "string"],
    ["--max-parallel-loading-workers", "2"], ["--prefix-caching-hash-algo", "sha256"],
    ["--disable-sliding-window"], ["--logits-processors", "my.Proc"],
    ["--max-long-partial-prefills", "2"], ["--long-prefill-token-threshold", "512"],
    ["--chat-template-content-format", "openai"],
    ["--otlp-traces-endpoint", "http://otel:4317"], ["--middleware", "m.f"],
    ["--headless"], ["--data-parallel-address", "10.0.0.1"],
    ["--data-parallel-rpc-port", "13345"], ["--data-parallel-size-local", "1"],
    ["--api-server-count", "1"], ["--log-config-file", "log.json"], ["--model-impl", "auto"],
    ["--kv-transfer-config", '{"kv_connector": "X"}'], ["--mm-processor-kwargs", "{}"],
    ["--disable-mm-preprocessor-cache"], ["--enable-server-load-tracking"],
    ["--disable-fastapi-docs"], ["--tool-server", "demo"], ["--max-model-len", "1k"],
    ["--disable-uvicorn-access-log"], ["-O0"], ["--compilation-config.level", "0"],
    ["--structured-outputs-config.backend", "xgrammar"], ["--enable-log-outputs"],
]  # fmt: skip


def parse(form: str, *argv: str) -> argparse.Namespace:
    if form == "serve":
        return build_parser().parse_args(["serve", *argv])
    return make_parser().parse_args(list(argv))


FORMS = ["serve", "api_server"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: " ".join(f))
def test_every_vllm_flag_parses(form: str, flag: list[str]) -> None:
    parse(form, "--model", "/m", *flag)


@pytest.mark.parametrize("form", FORMS)
def test_defaults_and_default_values_are_not_refused(form: str) -> None:
    vllm_compat.check(parse(form))
    at_default = [
        "--tokenizer-mode", "auto", "--swap-space", "4", "--cpu-offload-gb", "0",
        "--scheduling-policy", "fcfs", "--generation-config", "auto", "-O", "3",
        "--max-num-partial-prefills", "1", "--api-server-count", "1", "--model-impl", "auto",
        "--lora-dtype", "auto", "--response-role", "assistant", "--enable-chunked-prefill",
        "--chat-template-content-format", "auto", "--prefix-caching-hash-algo", "sha256",
        "--distributed-executor-backend", "mp", "--guided-decoding-backend", "auto",
        "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1",
        "--compilation-config", "{}", "--kv-transfer-config", "{}", "--revision", "main",
        "--mm-processor-kwargs", "{}", "--cuda-graph-sizes", "512", "-pp", "1",
    ]  # fmt: skip
    vllm_compat.check(parse(form, *at_default))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--cpu-offload-gb", "4"], "--quantization"),
        (["-pp", "2"], "--tensor-parallel-size"),
        (["--pipeline-parallel-size", "4"], "--data-parallel-size"),
        (["--headless"], "one `modelport serve` per host"),
        (["--data-parallel-address", "10.0.0.1"], "multi-node"),
        (["-dp", "2", "--data-parallel-size-local", "1"], "--data-parallel-size alone"),
        (["--api-server-count", "4"], "one API server"),
        (["--kv-transfer-config", '{"kv_connector": "X"}'], "KV transfer"),
        (["--tokenizer-mode", "mistral"], "--tokenizer-mode auto"),
        (["--model-impl", "transformers"], "built-in"),
        (["--cuda-graph-sizes", "1", "2", "4"], "--enforce-eager"),
        (["--cuda-graph-sizes", "0"], "one size"),
        (["-O", "2", "--compilation-config.use_inductor", "false"], "-O 0"),
        (["--compilation-config", '{"cudagraph_capture_sizes": [1]}'], "--enforce-eager"),
        (["--distributed-executor-backend", "ray"], "mp"),
        (["--otlp-traces-endpoint", "http://x"], "/metrics"),
        (["--lora-dtype", "float16"], "auto"),
        (["--long-lora-scaling-factors", "4"], "long-context"),
        (["--mm-processor-kwargs", '{"num_crops": 4}'], "multimodal"),
        (["--guided-decoding-backend", "outlines"], "xgrammar"),
        (["--tool-server", "demo"], "tool server"),
        (["--revision", "v2"], "--model"),
        (["--tokenizer-revision", "v2"], "--tokenizer"),
    ],
)
def test_refused_values_say_what_to_use_instead(argv: list[str], says: str) -> None:
    for form in FORMS:
        with pytest.raises(SystemExit) as e:
            vllm_compat.check(parse(form, *argv))
        msg = str(e.value.code)
        flag = {"-dp": "--data-parallel-size-local", "-O": "--compilation-config",
                "-pp": "--pipeline-parallel-size"}.get(argv[0], argv[0])
        assert msg.startswith(f"modelport serve: {flag}")
        assert "is not supported" in msg and says in msg, msg


@pytest.mark.parametrize("form", FORMS)
def test_generation_config_response_role_and_prompt_tokens_details_are_served(form: str) -> None:
    """Once refused, now served (tests/test_generation_config.py runs them): the generation
    config flags are engine flags, defined once, and reach EngineArgs."""
    args = parse(form, "--model", "/m", "--generation-config", "/models/gen",
                 "--override-generation-config", '{"temperature": 0.5}',
                 "--response-role", "bot", "--enable-prompt-tokens-details")
    vllm_compat.check(args)
    ea = engine_args_from(args)
    assert ea.generation_config == "/models/gen"
    assert ea.override_generation_config == {"temperature": 0.5}
    assert args.response_role == "bot" and args.enable_prompt_tokens_details
    assert engine_args_from(parse(form, "--model", "/m")).generation_config == "auto"
    assert "--generation-config" not in {r.flag for r in vllm_compat.REFUSALS}
    assert "--response-role" not in {r.flag for r in vllm_compat.REFUSALS}


@pytest.mark.parametrize("form", FORMS)
def test_sliding_window_partial_prefills_and_content_format_are_served(form: str) -> None:
    """Once refused, now served (tests/test_vllm_compat_served.py runs them): engine flags
    defined once, reaching EngineArgs; the content format is the server's."""
    args = parse(form, "--model", "/m", "--disable-sliding-window",
                 "--max-num-partial-prefills", "4", "--max-long-partial-prefills", "2",
                 "--long-prefill-token-threshold", "256",
                 "--chat-template-content-format", "openai")
    vllm_compat.check(args)
    ea = engine_args_from(args)
    assert ea.disable_sliding_window and ea.max_num_partial_prefills == 4
    assert ea.max_long_partial_prefills == 2 and ea.long_prefill_token_threshold == 256
    assert args.chat_template_content_format == "openai"
    d = engine_args_from(parse(form, "--model", "/m"))
    assert not d.disable_sliding_window and d.long_prefill_token_threshold == 0
    served = {"--disable-sliding-window", "--max-num-partial-prefills",
              "--max-long-partial-prefills", "--chat-template-content-format"}
    assert not served & {r.flag for r in vllm_compat.REFUSALS}


def test_refusal_ends_the_server_build_before_any_route() -> None:
    with pytest.raises(SystemExit, match="--headless is not supported"):
        build_app(parse("api_server", "--headless"))


def test_enable_sleep_mode_is_served() -> None:
    assert "--enable-sleep-mode" not in {r.flag for r in vllm_compat.REFUSALS}
    assert engine_args_from(parse("api_server", "--model", "/m", "--enable-sleep-mode")
                            ).enable_sleep_mode
    assert not engine_args_from(parse("api_server", "--model", "/m")).enable_sleep_mode


@pytest.mark.parametrize(
    ("text", "value"),
    [("2048", 2048), ("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("32K", 32768),
     ("1m", 10**6), ("1M", 1 << 20), ("2g", 2 * 10**9), ("1G", 1 << 30), ("0.5k", 500)],
)
def test_max_model_len_human_readable(text: str, value: int) -> None:
    for form in FORMS:
        assert parse(form, "--max-model-len", text).max_model_len == value
    assert parse("serve", "--max-num-batched-tokens", text).max_num_batched_tokens == value


@pytest.mark.parametrize("bad", ["1.5K", "1.5", "lots", "1kk", "-1k"])
def test_max_model_len_bad_values(bad: str) -> None:
    with pytest.raises(SystemExit):
        parse("serve", "--max-model-len", bad)


def test_config_file_merges_and_the_command_line_wins(tmp_path) -> None:  # noqa: ANN001
    f = tmp_path / "serve.yaml"
    f.write_text(
        "model: /models/llama\n"
        "max-model-len: 4k\n"
        "max_num_seqs: 8\n"
        "enforce-eager: true\n"
        "enable-prefix-caching: false\n"
        "served-model-name: [a, b]\n"
        'speculative-config: {"method": "ngram", "num_speculative_tokens": 2}\n'
        "port: 9000\n"
    )
    for form in FORMS:
        # a command-line flag wins over the file's, before or after --config
        args = parse(form, "--max-num-seqs", "16", "--config", str(f), "--port", "9100")
        assert args.model == "/models/llama" and args.max_model_len == 4000
        assert args.max_num_seqs == 16 and args.port == 9100
        assert args.enforce_eager and args.enable_prefix_caching is False
        assert args.served_model_name == ["a", "b"]
        assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}
        assert engine_args_from(args).max_model_len == 4000
        assert parse(form, f"--config={f}").max_num_seqs == 8


def test_config_file_keeps_the_command_lines_model(tmp_path) -> None:  # noqa: ANN001
    """`serve MODEL --config f`: a list last in the file does not swallow MODEL, and the
    command line's model (positional or --model) wins over the file's `model:`."""
    f = tmp_path / "serve.yaml"
    f.write_text("model: /models/file\nport: 9000\nserved-model-name: [a, b]\n")
    args = parse("serve", "/models/cli", "--config", str(f))
    take_model_tag(args)
    assert args.model == "/models/cli" and args.served_model_name == ["a", "b"]
    assert args.port == 9000
    for form in FORMS:
        args = parse(form, "--config", str(f), "--model", "/models/cli")
        assert args.model == "/models/cli" and args.served_model_name == ["a", "b"]
        assert parse(form, "--config", str(f)).model == "/models/file"


def test_config_file_errors(tmp_path, capsys) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("no-such-flag: 1\n")
    for argv in (["--config", str(tmp_path / "missing.yaml")], ["--config", str(bad)],
                 ["--config", str(unknown)]):
        with pytest.raises(SystemExit) as e:
            parse("serve", *argv)
        assert e.value.code == 2
    assert "no-such-flag" in capsys.readouterr().err


def _client(*argv: str) -> TestClient:
    app, _, _ = build_app(parse("api_server", *argv))
    return TestClient(app)  # no `with`: the engine is not loaded


def test_cors_as_vllm_by_default_and_as_configured() -> None:
    pre = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    r = _client().options("/v1/models", headers=pre)  # vLLM's default: every origin
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    no = _client("--no-cors").options("/v1/models", headers=pre)
    assert "access-control-allow-origin" not in no.headers
    r = _client("--allowed-origins", '["*"]').options("/v1/models", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    c = _client("--allowed-origins", '["http://ui.example"]', "--allowed-methods", '["GET"]',
                "--allow-credentials")
    r = c.options("/v1/models", headers={**pre, "Access-Control-Request-Method": "GET"})
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert c.options("/v1/models", headers=pre).status_code == 400  # POST not allowed
    other = {**pre, "Origin": "http://evil.example"}
    assert "access-control-allow-origin" not in c.options("/v1/models", headers=other).headers
    with pytest.raises(SystemExit):
        parse("serve", "--allowed-origins", "*")  # vLLM takes a JSON list


def test_fastapi_docs_and_root_path() -> None:
    assert _client().get("/docs").status_code == 200
    c = _client("--disable-fastapi-docs")
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert c.get(path).status_code == 404
    args = parse("serve", "--root-path", "/api")
    assert vllm_compat.uvicorn_kwargs(args) == {"log_level": "info", "root_path": "/api"}


def test_request_id_headers_and_load_tracking() -> None:
    assert "x-request-id" not in _client().get("/health").headers
    c = _client("--enable-request-id-headers", "--enable-server-load-tracking")
    assert len(c.get("/health").headers["x-request-id"]) == 32
    assert c.get("/health", headers={"X-Request-Id": "abc"}).headers["x-request-id"] == "abc"
    c.get("/v1/models")  # 503 while loading; counted and done
    assert c.get("/load").json() == {"server_load": 0}
    assert _client().get("/load").status_code == 404


async def tag_response(request, call_next):  # noqa: ANN001, ANN201 - a --middleware function
    response = await call_next(request)
    response.headers["x-tagged"] = "1"
    return response


def test_middleware_flag() -> None:
    assert _client("--middleware", f"{__name__}.tag_response").get("/health").headers[
        "x-tagged"] == "1"
    with pytest.raises(SystemExit, match="--middleware"):
        _client("--middleware", "no_such_module.f")
    with pytest.raises(SystemExit, match="not a middleware"):
        _client("--middleware", f"{__name__}.FLAGS")


def test_log_requests(caplog: pytest.LogCaptureFixture) -> None:
    c = _client("--enable-log-requests", "--max-log-len", "12")
    with caplog.at_level("INFO", logger="modelport.requests"):
        c.post("/v1/completions", json={"model": "m", "prompt": "hello world"})
    assert any(r.getMessage() == 'POST /v1/completions: {"model":"m"' for r in caplog.records)
    assert not any("response" in r.getMessage() for r in caplog.records)


def test_log_outputs(caplog: pytest.LogCaptureFixture) -> None:
    """--enable-log-outputs logs what was answered: a JSON body, or each event of a stream."""
    import json

    from starlette.responses import StreamingResponse

    c = _client("--enable-log-requests", "--enable-log-outputs")

    async def events():  # noqa: ANN202
        for piece in ("Hel", "lo"):
            yield f"data: {json.dumps({'text': piece})}\n\n"
        yield "data: [DONE]\n\n"

    c.app.add_api_route("/v1/test-stream", lambda: StreamingResponse(
        events(), media_type="text/event-stream"), methods=["POST"])
    with caplog.at_level("INFO", logger="modelport.requests"):
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hello world"})
        c.post("/v1/test-stream", json={})
    said = [rec.getMessage() for rec in caplog.records]
    assert 'POST /v1/completions: {"model":"m","prompt":"hello world"}' in said
    assert f"POST /v1/completions response {r.status_code}: {r.text}" in said  # 503: loading
    assert [m for m in said if m.startswith("POST /v1/test-stream response")] == [
        'POST /v1/test-stream response 200 (stream): data: {"text": "Hel"}',
        'POST /v1/test-stream response 200 (stream): data: {"text": "lo"}',
        "POST /v1/test-stream response 200 (stream): data: [DONE]",
    ]


@pytest.mark.parametrize("form", FORMS)
def test_optimization_level_zero_runs_eager_and_dotted_json_flags(form: str) -> None:
    """vLLM's -O0 (no compilation, no CUDA graphs) is --enforce-eager; the dotted form of a
    JSON flag sets one key of it, merged with the flag's own JSON."""
    for eager in (["-O0"], ["-O", "0"], ["--compilation-config", '{"level": 0}'],
                  ["-O.level", "0"], ["--compilation-config.cudagraph_mode=NONE"]):
        args = parse(form, *eager)
        vllm_compat.check(args)
        assert engine_args_from(args).enforce_eager is True, eager
    for graphs in (["-O3"], ["-O", "1"], ["--compilation-config.cudagraph_mode", "FULL"], []):
        args = parse(form, *graphs)
        vllm_compat.check(args)
        assert engine_args_from(args).enforce_eager is False, graphs
    args = parse(form, "--structured-outputs-config", '{"reasoning_parser": "x"}',
                 "--structured-outputs-config.backend", "xgrammar")
    assert args.structured_outputs_config == {"reasoning_parser": "x", "backend": "xgrammar"}
    args = parse(form, "--override-generation-config.temperature=0.5",
                 "--override-generation-config.top_p", "0.9")
    assert args.override_generation_config == {"temperature": 0.5, "top_p": 0.9}


def test_uvicorn_settings() -> None:
    args = parse("serve", "--disable-uvicorn-access-log")
    assert vllm_compat.uvicorn_kwargs(args)["access_log"] is False
    args = parse("serve", "--log-level", "debug")
    assert vllm_compat.uvicorn_kwargs(args) == {"log_level": "debug"}
    args = parse("api_server", "--uvicorn-log-level", "warning", "--ssl-keyfile", "k.pem",
                 "--ssl-certfile", "c.pem", "--log-config-file", "log.json")
    assert vllm_compat.uvicorn_kwargs(args) == {
        "log_level": "warning", "ssl_keyfile": "k.pem", "ssl_certfile": "c.pem",
        "log_config": "log.json"}


def test_engine_flags_reach_the_engine_config() -> None:
    args = parse("serve", "--no-enable-chunked-prefill", "--num-gpu-blocks-override", "77",
                 "--max-model-len", "1K", "--load-format", "dummy", "--device", "cpu")
    ea = engine_args_from(args)
    assert ea.enable_chunked_prefill is False and ea.num_gpu_blocks_override == 77
    cfg = ea.create_engine_config()
    assert cfg.cache_config.num_gpu_blocks_override == 77
    sc = cfg.scheduler_config
    assert not sc.enable_chunked_prefill and sc.max_num_batched_tokens >= 1024
    cfg = engine_args_from(parse("serve", "--device", "cpu")).create_engine_config()
    assert cfg.scheduler_config.enable_chunked_prefill
    assert cfg.cache_config.num_gpu_blocks_override is None
    assert cfg.max_graph_batch == 512  # vLLM's capture limit
    cfg = engine_args_from(parse("serve", "--device", "cpu", "--cuda-graph-sizes", "64")
                           ).create_engine_config()
    assert cfg.max_graph_batch == 64  # decode batches past 64 rows run eagerly


def test_response_flags() -> None:
    from modelport.entrypoints.openai.protocol import CompletionRequest
    from modelport.entrypoints.openai.serving_common import token_text, usage_options

    engine = types.SimpleNamespace(decode_token=lambda t: "hi", return_tokens_as_token_ids=True)
    assert token_text(engine, 42, None) == "token_id:42"  # type: ignore[arg-type]
    engine.return_tokens_as_token_ids = False
    assert token_text(engine, 42, None) == "hi"  # type: ignore[arg-type]
    req = CompletionRequest(model="m", prompt="x", stream=True)
    assert usage_options(req) == (False, False)
    assert usage_options(req, force=True) == (True, False)
    req = CompletionRequest(model="m", prompt="x", stream=True,
                            stream_options={"include_usage": False})
    assert usage_options(req, force=True) == (True, False)


def test_num_gpu_blocks_override_sizes_the_kv_cache(tmp_path) -> None:
    """The engine holds exactly the blocks asked for, whatever the memory budget gives, and
    serves within them."""
    from helpers.tiny_models import make_tiny_llama_dir
    from modelport import SamplingParams
    from modelport.engine.arg_utils import EngineArgs
    from modelport.engine.llm_engine import LLMEngine

    d = make_tiny_llama_dir(tmp_path / "m")
    kw = dict(model=str(d), device="cpu", max_model_len=64, block_size=4,
              kv_cache_memory=4 << 20)
    budget = LLMEngine.from_engine_args(EngineArgs(**kw)).num_kv_blocks
    engine = LLMEngine.from_engine_args(EngineArgs(**kw, num_gpu_blocks_override=24))
    assert engine.num_kv_blocks == 24 != budget
    engine.add_request("r", [256, 10, 20, 30], SamplingParams(max_tokens=5, ignore_eos=True))
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert len(done[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="cannot hold one max_model_len request"):
        LLMEngine.from_engine_args(EngineArgs(**kw, num_gpu_blocks_override=8))  # 16 needed
