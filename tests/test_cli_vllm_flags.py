"""vLLM command lines and `LLM(...)` arguments as users carry them over (vllm_engine_flags.py,
vllm_compat.py): real `vllm serve` lines from vLLM's and model vendors' deployment docs parse
into the settings they ask for; the flags vLLM added or dropped over its versions are served,
accepted (modelport already behaves so) or refused naming the alternative; `LLM(**kwargs)`
follows the same table, with vLLM's TypeError for a name it does not take."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import threading
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM
from modelport.config import merge_rope_overrides
from modelport.engine.arg_utils import EngineArgs
from modelport.entrypoints import vllm_compat, vllm_engine_flags
from modelport.entrypoints.cli import build_parser
from modelport.entrypoints.cli_serve import take_model_tag
from modelport.entrypoints.openai.api_server import build_app, engine_args_from, make_parser

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def serve(line: str) -> argparse.Namespace:
    """`vllm serve LINE` as `modelport serve LINE`, checked as the server checks it."""
    args = build_parser().parse_args(["serve", *shlex.split(line)])
    take_model_tag(args)
    vllm_compat.check(args)
    return args


def api_server(line: str) -> argparse.Namespace:
    """The same line in the `python -m ...api_server --model MODEL` form."""
    model, *rest = shlex.split(line)
    args = make_parser().parse_args(["--model", model, *rest])
    vllm_compat.check(args)
    return args


# (the line after `vllm serve`, EngineArgs fields, other settings): vLLM's quickstart, tool
# calling, reasoning outputs, LoRA, speculative decoding and structured outputs pages; Qwen's,
# DeepSeek's and Gemma's vLLM instructions; production-stack style launch scripts
REAL: list[tuple[str, dict, dict]] = [
    ("NousResearch/Meta-Llama-3-8B-Instruct --dtype auto --api-key token-abc123",
     {"model": "NousResearch/Meta-Llama-3-8B-Instruct", "dtype": "auto"},
     {"api_key": ["token-abc123"]}),
    ("meta-llama/Llama-3.1-8B-Instruct --enable-auto-tool-choice --tool-call-parser llama3_json "
     "--chat-template examples/tool_chat_template_llama3.1_json.jinja", {},
     {"enable_auto_tool_choice": True, "tool_call_parser": "llama3_json",
      "chat_template": "examples/tool_chat_template_llama3.1_json.jinja"}),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --enable-reasoning --reasoning-parser deepseek_r1",
     {"reasoning_parser": "deepseek_r1"}, {"enable_reasoning": True}),
    ("Qwen/Qwen3-8B --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser hermes",
     {"reasoning_parser": "qwen3"}, {"tool_call_parser": "hermes"}),
    (f"Qwen/Qwen2.5-7B-Instruct --rope-scaling '{json.dumps(YARN)}' --max-model-len 131072",
     {"hf_overrides": {"rope_scaling": YARN}, "max_model_len": 131072}, {}),
    ("Qwen/Qwen2.5-7B-Instruct --hf-overrides '{\"rope_theta\": 1000000}' --rope-theta 1000000",
     {"hf_overrides": {"rope_theta": 1000000}}, {}),
    ("deepseek-ai/DeepSeek-V3 --tensor-parallel-size 8 --trust-remote-code --max-model-len 16384",
     {"tensor_parallel_size": 8, "trust_remote_code": True, "max_model_len": 16384}, {}),
    ("meta-llama/Llama-3.1-8B-Instruct --host 0.0.0.0 --port 8000 --gpu-memory-utilization 0.9 "
     "--max-num-seqs 256 --max-num-batched-tokens 8192 --enable-chunked-prefill "
     "--enable-prefix-caching --disable-log-requests --disable-log-stats --uvicorn-log-level "
     "warning --served-model-name llama3 --seed 0 --swap-space 16 --block-size 16 "
     "--kv-cache-dtype fp8 --max-logprobs 20 --download-dir /data/hf --load-format safetensors",
     {"gpu_memory_utilization": 0.9, "max_num_seqs": 256, "max_num_batched_tokens": 8192,
      "enable_chunked_prefill": True, "enable_prefix_caching": True, "seed": 0,
      "block_size": 16, "kv_cache_dtype": "fp8", "max_logprobs": 20,
      "served_model_name": "llama3", "load_format": "safetensors"},
     {"host": "0.0.0.0", "port": 8000, "uvicorn_log_level": "warning"}),
    ("google/gemma-3-27b-it --limit-mm-per-prompt image=0 --max-model-len 8k",
     {"max_model_len": 8000}, {"limit_mm_per_prompt": {"image": 0}}),
    ("Qwen/Qwen3-30B-A3B -tp 2 --enable-expert-parallel --async-scheduling -O3 "
     "--max-cudagraph-capture-size 256",
     {"tensor_parallel_size": 2, "enable_expert_parallel": True, "async_scheduling": True,
      "cuda_graph_sizes": [256], "enforce_eager": False}, {}),
    ("m -O.cudagraph_mode=FULL_DECODE_ONLY -O.max_cudagraph_capture_size=64",
     {"cuda_graph_sizes": [64], "enforce_eager": False}, {}),
    ("m --cudagraph-capture-sizes 128", {"cuda_graph_sizes": [128]}, {}),
    ("unsloth/llama-3-8b-bnb-4bit --quantization bitsandbytes --load-format bitsandbytes",
     {"quantization": "bitsandbytes", "load_format": "auto"}, {}),
    ("m --load-format bitsandbytes", {"quantization": "bitsandbytes", "load_format": "auto"}, {}),
    ("m -O0 --max-seq-len-to-capture 8192", {"enforce_eager": True}, {}),
    ("m --no-enable-prefix-caching --no-enforce-eager --no-trust-remote-code "
     "--no-enable-chunked-prefill --no-async-scheduling --no-enable-lora",
     {"enable_prefix_caching": False, "enforce_eager": False, "trust_remote_code": False,
      "enable_chunked_prefill": False, "async_scheduling": False, "enable_lora": False}, {}),
    ("m --generation-config vllm --override-generation-config "
     "'{\"temperature\": 0.6, \"top_p\": 0.95}'",
     {"generation_config": "vllm",
      "override_generation_config": {"temperature": 0.6, "top_p": 0.95}}, {}),
    ("m --enable-lora --lora-modules sql-lora=/adapters/sql --max-loras 4 --max-lora-rank 64 "
     "--max-cpu-loras 8", {"enable_lora": True, "max_loras": 4, "max_lora_rank": 64,
                           "max_cpu_loras": 8}, {}),
    ("m --speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 5, "
     "\"prompt_lookup_max\": 4}'",
     {"speculative_config": {"method": "ngram", "num_speculative_tokens": 5,
                             "prompt_lookup_max": 4}}, {}),
    ("m --structured-outputs-config.backend xgrammar --guided-decoding-disable-any-whitespace "
     "--guided-decoding-disable-fallback",
     {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True,
                                    "disable_fallback": True}}, {}),
    ("m --revision main --hf-token --tokenizer-mode auto --config-format hf --use-v2-block-manager "
     "--num-scheduler-steps 1 --disable-async-output-proc --preemption-mode recompute "
     "--distributed-executor-backend mp --disable-custom-all-reduce --attention-backend "
     "FLASH_ATTN --disable-cascade-attn --logprobs-mode raw_logprobs --safetensors-load-strategy "
     "lazy --ignore-patterns 'original/**/*' --uds /tmp/vllm.sock --api-key a b "
     "--exclude-tools-when-tool-choice-none --log-error-stack --ssl-cert-reqs 0", {},
     {"uds": "/tmp/vllm.sock", "api_key": ["a", "b"], "exclude_tools_when_tool_choice_none": True,
      "log_error_stack": True, "hf_token": True, "attention_backend": "FLASH_ATTN"}),
]  # fmt: skip


@pytest.mark.parametrize(("line", "engine", "other"), REAL, ids=[r[0][:60] for r in REAL])
def test_real_vllm_command_lines(line: str, engine: dict, other: dict) -> None:
    for args in (serve(line), api_server(line)):
        ea = engine_args_from(args)
        for k, v in engine.items():
            assert getattr(ea, k) == v, k
        for k, v in other.items():
            assert getattr(args, k) == v, k
        assert ea.model == shlex.split(line)[0]


# flags vLLM added (FrontendArgs, EngineArgs of v0.11+) or dropped (V0), asking for what
# modelport does not do: refused before the server listens, naming the alternative
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--num-scheduler-steps", "8"], "--async-scheduling"),
        (["--speculative-model", "[ngram]", "--num-speculative-tokens", "5",
          "--ngram-prompt-lookup-max", "4"],
         '--speculative-config \'{"method": "ngram", "num_speculative_tokens": 5, '
         '"prompt_lookup_max": 4}\''),
        (["--speculative-model", "/draft", "--num-speculative-tokens", "3"],
         '\'{"model": "/draft", "num_speculative_tokens": 3}\''),
        (["--enable-reasoning"], "--reasoning-parser"),
        (["--cudagraph-capture-sizes", "1", "2", "4", "8"], "--max-cudagraph-capture-size"),
        (["-dcp", "2"], "--tensor-parallel-size"),
        (["--data-parallel-rank", "1"], "--data-parallel-size alone"),
        (["-dpb", "ray"], "mp"),
        (["--kv-offloading-size", "64"], "--gpu-memory-utilization"),
        (["--skip-tokenizer-init"], "detokenizes"),
        (["--enable-prompt-embeds"], "token ids"),
        (["--logprobs-mode", "processed_logprobs"], "raw_logprobs"),
        (["--calculate-kv-scales"], "scale 1.0"),
        (["--enable-eplb"], "--enable-expert-parallel"),
        (["--expert-placement-strategy", "round_robin"], "linear"),
        (["--worker-extension-cls", "rl.WorkerExt"], "collective_rpc"),
        (["--tool-parser-plugin", "my_parser.py"], "--tool-call-parser"),
        (["--enable-ssl-refresh"], "restart"),
        (["--h11-max-header-count", "512"], "--h11-max-incomplete-event-size"),
        (["--preemption-mode", "swap"], "recompute"),
        (["--config-format", "mistral"], "--config-format auto"),
        (["--model-loader-extra-config", '{"x": 1}'], "model loaders"),
        (["--kv-events-config", '{"enable_kv_cache_events": true}'], "/metrics"),
        (["--worker-use-ray"], "local processes"),
        (["--grpc"], "HTTP"),
        (["--load-format", "pt"], "convert .bin / .pt weights to safetensors"),
        (["--load-format", "bitsandbytes", "--quantization", "awq"], "--quantization bitsandbytes"),
        (["--kv-cache-dtype", "fp8_e5m2"], "e4m3"),
        (["--spec-decoding-acceptance-method", "typical_acceptance_sampler"], "rejection"),
        (["--prompt-adapters", "a=/p"], "--enable-lora"),
    ],
)
def test_refused_values_say_what_to_use_instead(argv: list[str], says: str) -> None:
    for parse in (lambda a: build_parser().parse_args(["serve", *a]),
                  lambda a: make_parser().parse_args(a)):
        with pytest.raises(SystemExit) as e:
            vllm_compat.check(parse(argv))
        msg = str(e.value.code)
        assert msg.startswith("modelport serve: --") and "is not supported" in msg, msg
        assert says in msg, msg


def test_every_flag_at_vllms_default_is_accepted() -> None:
    """Each flag added here, given its vLLM default (or a value modelport honours), starts."""
    at_default = (
        "--decode-context-parallel-size 1 -dpb mp --data-parallel-start-rank 0 "
        "--no-data-parallel-hybrid-lb --no-enable-dbo --no-enable-eplb --num-redundant-experts 0 "
        "--eplb-window-size 1000 --eplb-step-interval 3000 --no-eplb-log-balancedness "
        "--expert-placement-strategy linear --no-ray-workers-use-nsight --worker-cls auto "
        "--worker-extension-cls '' --all2all-backend allgather_reducescatter "
        "--no-disable-nccl-for-dp-synchronization --dbo-decode-token-threshold 32 "
        "--no-calculate-kv-scales --no-kv-sharing-fast-prefill --mamba-cache-dtype auto "
        "--mamba-ssm-cache-dtype auto --num-lookahead-slots 0 --no-disable-chunked-mm-input "
        "--no-disable-hybrid-kv-cache-manager --scheduler-cls "
        "vllm.v1.core.sched.scheduler.Scheduler --kv-events-config '{}' --additional-config '{}' "
        "--show-hidden-metrics-for-version 0.10 --aggregate-engine-logging "
        "--fail-on-environ-validation --lora-extra-vocab-size 256 --default-mm-loras '{}' "
        "--no-enable-lora-bias --allowed-local-media-path /data --allowed-media-domains a.com "
        "--media-io-kwargs '{}' --mm-processor-cache-gb 4 --mm-processor-cache-type lru "
        "--mm-shm-cache-max-object-size-mb 128 --mm-encoder-tp-mode weights "
        "--mm-encoder-attn-backend TORCH_SDPA --no-interleave-mm-strings --skip-mm-profiling "
        "--video-pruning-rate 0 --no-enable-mm-embeds --enable-multimodal-encoder-data-parallel "
        "--guided-decoding-disable-additional-properties --no-skip-tokenizer-init "
        "--no-enable-prompt-embeds --logprobs-mode raw_logprobs --config-format auto "
        "--use-tqdm-on-load --pt-load-map-location cpu --model-loader-extra-config '{}' "
        "--code-revision main --tokenizer-revision main --multi-step-stream-outputs "
        "--scheduler-delay-factor 0 --tokenizer-pool-size 0 --tokenizer-pool-type ray "
        "--no-enable-prompt-adapter --spec-decoding-acceptance-method rejection_sampler "
        "--no-enable-auto-tool-choice --no-trust-request-chat-template "
        "--gdn-prefill-backend triton --kv-offloading-backend native "
        "--disable-frontend-multiprocessing --api-server-count 1 --enable-log-deltas "
        "--no-enable-ssl-refresh --h11-max-header-count 256 --h11-max-incomplete-event-size "
        "4194304 --no-enable-tokenizer-info-endpoint --no-tokens-only --shutdown-timeout 0 "
        "--tool-parser-plugin '' --max-context-len-to-capture 8192 --no-allow-credentials "
        "--no-disable-fastapi-docs --no-enable-request-id-headers --no-enable-log-requests "
        "--no-return-tokens-as-token-ids --no-enable-prompt-tokens-details "
        "--no-enable-force-include-usage --no-enable-server-load-tracking "
        "--no-disable-uvicorn-access-log --no-enable-log-outputs --no-fully-sharded-loras "
        "--no-disable-sliding-window --no-enable-sleep-mode --no-enable-expert-parallel"
    )
    for args in (serve("m " + at_default), api_server("m " + at_default)):
        assert engine_args_from(args).model == "m"


def test_uvicorn_settings_of_the_new_flags() -> None:
    args = serve("m --uds /tmp/s.sock --ssl-cert-reqs 2 --h11-max-incomplete-event-size 1024 "
                 "--shutdown-timeout 30")
    assert vllm_compat.uvicorn_kwargs(args) == {
        "log_level": "info", "uds": "/tmp/s.sock", "ssl_cert_reqs": 2,
        "h11_max_incomplete_event_size": 1024, "timeout_graceful_shutdown": 30.0}
    assert vllm_compat.uvicorn_kwargs(serve("m")) == {"log_level": "info"}


def test_uds_serves_the_api_on_a_unix_socket(tmp_path: Path) -> None:
    """--uds: the server listens on the socket (no TCP port); /version answers there."""
    import uvicorn

    sock = str(tmp_path / "mp.sock")
    args = make_parser().parse_args(["--uds", sock, "--uvicorn-log-level", "error"])
    app, _, _ = build_app(args)  # its engine is not started: nothing loads
    server = uvicorn.Server(uvicorn.Config(app, **vllm_compat.uvicorn_kwargs(args)))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://mp") as c:
            assert "version" in c.get("/version").json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_several_api_keys_and_vllms_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    def client(*argv: str) -> TestClient:
        app, _, _ = build_app(make_parser().parse_args(list(argv)))
        return TestClient(app)  # no engine: an authorized /v1/models is a 503 (loading)

    c = client("--api-key", "k1", "k2")
    for key, status in (("k1", 503), ("k2", 503), ("k3", 401), ("", 401)):
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code \
            == status, key
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    c = client()
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 503
    assert client("--api-key", "flag").get(  # the flag wins, as in vLLM
        "/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 401


def test_api_key_does_not_silently_take_the_model(tmp_path: Path) -> None:
    """`serve --api-key KEY MODEL`: --api-key takes every word (vLLM's nargs), so MODEL would
    be a key and the default model served; a key that is a path is said instead."""
    model = tmp_path / "llama"
    model.mkdir()
    args = build_parser().parse_args(["serve", "--api-key", "k", str(model)])
    with pytest.raises(SystemExit, match="took the path"):
        take_model_tag(args)
    args = build_parser().parse_args(["serve", str(model), "--api-key", "k"])
    take_model_tag(args)
    assert args.model == str(model) and args.api_key == ["k"]


def test_exclude_tools_when_tool_choice_none() -> None:
    from modelport.entrypoints.openai.protocol import ChatCompletionRequest
    from modelport.entrypoints.openai.tools import ToolSettings, plan_tools

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                tools=[tool], tool_choice="none")
    assert plan_tools(req, ToolSettings()).template_tools[0]["function"]["name"] == "f"
    hide = ToolSettings(exclude_tools_when_none=True)
    assert plan_tools(req, hide).template_tools is None
    req.tool_choice = None  # tools without a choice: "auto", which still sees them
    with pytest.raises(Exception, match="enable-auto-tool-choice"):
        plan_tools(req, hide)


def test_log_error_stack(caplog: pytest.LogCaptureFixture) -> None:
    def post(*argv: str) -> None:
        app, _, _ = build_app(make_parser().parse_args(list(argv)))
        r = TestClient(app).post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503  # the model is still loading: an OpenAIError

    with caplog.at_level(logging.ERROR, logger="modelport.openai"):
        post()
        assert not [r for r in caplog.records if r.exc_info]
        post("--log-error-stack")
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "error 503 in /v1/completions" in logged[0].getMessage()


def test_disable_any_whitespace_reaches_every_requests_grammar() -> None:
    from modelport.engine.structured_output import StructuredOutputManager
    from modelport.sampling_params import StructuredOutputsParams

    keys = []

    class Recording(StructuredOutputManager):
        def _compile(self, key: tuple) -> object:
            keys.append(key)
            return object()

    so = StructuredOutputsParams(json={"type": "object"})
    Recording(lambda: None, 10).compile(so)
    Recording(lambda: None, 10, disable_any_whitespace=True).compile(so)
    assert [k[2] for k in keys] == [False, True]


def test_structured_outputs_config_keys() -> None:
    ea = EngineArgs(structured_outputs_config={"disable_any_whitespace": True,
                                               "disable_fallback": True,
                                               "disable_additional_properties": False})
    assert ea._resolve_structured_outputs() == (None, False)
    with pytest.raises(ValueError, match="must be a boolean"):
        EngineArgs(structured_outputs_config={"disable_any_whitespace": "yes"}
                   )._resolve_structured_outputs()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("flags") / "tiny")


def test_rope_flags_reach_a_transformers_5_config(model_dir: Path) -> None:
    """A config.json written by transformers >= 5 keeps rope settings in rope_parameters,
    which the model reads first: --rope-theta / --rope-scaling (and hf_overrides of those
    keys) go there, not next to it where they would be ignored."""
    from modelport.layers.rotary import rope_settings

    hf = json.loads((model_dir / "config.json").read_text())
    assert "rope_parameters" in hf  # the layout this test is about
    merged = merge_rope_overrides(hf, {"rope_theta": 5e5,
                                       "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert merged["rope_parameters"] == {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}
    args = serve(f"{model_dir} --rope-theta 500000 --rope-scaling "
                 "'{\"rope_type\": \"linear\", \"factor\": 2.0}' --device cpu")
    mc = engine_args_from(args).create_engine_config().model_config
    s = rope_settings(mc)
    assert s.theta == 5e5 and s.scaling == {"rope_type": "linear", "factor": 2.0}
    other = json.dumps({"rope_type": "proportional", "factor": 2.0})
    with pytest.raises(ValueError, match="rope scaling type 'proportional'.*not supported"):
        engine_args_from(serve(f"{model_dir} --rope-scaling '{other}' --device cpu")
                         ).create_engine_config()
    with pytest.raises(SystemExit, match="--rope-theta and --hf-overrides' rope_theta differ"):
        serve("m --rope-theta 1 --hf-overrides '{\"rope_theta\": 2}'")


# -- LLM(**kwargs) -------------------------------------------------------------------------
def test_llm_takes_vllms_engine_arguments(model_dir: Path) -> None:
    llm = LLM(str(model_dir), kv_cache_memory=8 << 20, max_model_len=64, device="cpu",
              swap_space=4, cpu_offload_gb=0, compilation_config=0, tokenizer_mode="auto",
              served_model_name=["tiny-served"], disable_custom_all_reduce=True,
              num_gpu_blocks_override=20, rope_theta=20000.0, download_dir="/tmp",
              distributed_executor_backend="mp", max_context_len_to_capture=8192,
              max_parallel_loading_workers=None, enable_prompt_embeds=False, revision="main",
              logprobs_mode="raw_logprobs", limit_mm_per_prompt={"image": 0},
              guided_decoding_disable_any_whitespace=True)
    cfg = llm.llm_engine.config
    assert cfg.enforce_eager  # compilation_config=0, vLLM's -O0
    assert cfg.served_model_name == "tiny-served"
    assert cfg.cache_config.num_gpu_blocks_override == 20
    assert cfg.model_config.rope_theta == 20000.0
    assert cfg.disable_any_whitespace


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"no_such_argument": 1}, TypeError, "unexpected keyword arguments: no_such_argument"),
        ({"api_key": "k"}, TypeError, "api_key"),  # a server flag, not vLLM's LLM's
        ({"cpu_offload_gb": 4}, ValueError,
         "LLM(cpu_offload_gb=4) is not supported: weights are not offloaded"),
        ({"tokenizer_mode": "mistral"}, ValueError, "use tokenizer_mode auto"),
        ({"compilation_config": {"cudagraph_capture_sizes": [1, 2]}}, ValueError, "enforce_eager"),
        ({"distributed_executor_backend": "ray"}, ValueError, "distributed_executor_backend mp"),
        ({"worker_extension_cls": "rl.Ext"}, ValueError, "collective_rpc"),
        ({"enable_reasoning": True}, ValueError, "reasoning_parser NAME"),
        ({"data_parallel_size_local": 2}, ValueError, "data_parallel_size alone"),
        ({"load_format": "npcache"}, ValueError, "LLM(load_format='npcache') is not supported"),
        ({"kv_cache_dtype": "fp8_inc"}, ValueError, "kv_cache_dtype fp8"),
    ],
)
def test_llm_refuses_before_loading(kwargs: dict, error: type, says: str) -> None:
    with pytest.raises(error) as e:
        LLM("/no/such/model", **kwargs)  # refused before the model is looked for
    assert says in str(e.value)


def test_llm_kwargs_follow_the_serve_table() -> None:
    """LLM(...) and serve share one table: nothing is refused at its default, each engine
    refusal is one of an LLM argument, and the implemented ones map the same way."""
    parser = argparse.ArgumentParser()
    vllm_engine_flags.add_engine_compat_args(parser)
    defaults = parser.parse_args([])
    assert vllm_engine_flags.first_refusal(defaults, vllm_engine_flags.ENGINE_REFUSALS) is None
    # EngineArgs' own flags (LLM's own parameters) that the table checks too
    dests = set(vars(defaults)) | {"pipeline_parallel_size", "load_format", "kv_cache_dtype"}
    assert {r.dest for r in vllm_engine_flags.ENGINE_REFUSALS} <= dests
    assert vllm_engine_flags.llm_kwargs({"compilation_config": 0}, {"enforce_eager": False}) \
        == {"enforce_eager": True}
    assert vllm_engine_flags.llm_kwargs(
        {"max_cudagraph_capture_size": 64}, {"cuda_graph_sizes": None}) == \
        {"cuda_graph_sizes": [64]}


def test_a_vllm_yaml_config_file(tmp_path: Path) -> None:
    """vLLM's `--config` example, plus the list and bool forms launch files use."""
    f = tmp_path / "serve.yaml"
    f.write_text(
        "model: meta-llama/Llama-3.1-8B-Instruct\n"
        'host: "127.0.0.1"\n'
        "port: 6379\n"
        'uvicorn-log-level: "info"\n'
        "api-key: [k1, k2]\n"
        "trust-remote-code: false\n"
        "enable-prefix-caching: false\n"
        "enforce-eager: true\n"
        "enable-reasoning: true\n"
        "reasoning-parser: deepseek_r1\n"
        "rope-scaling: {rope_type: linear, factor: 2.0}\n"
        "max-cudagraph-capture-size: 64\n"
    )
    args = serve(f"--config {f} --port 8001")
    ea = engine_args_from(args)
    assert ea.model == "meta-llama/Llama-3.1-8B-Instruct" and args.port == 8001
    assert args.api_key == ["k1", "k2"] and args.uvicorn_log_level == "info"
    assert not ea.trust_remote_code and not ea.enable_prefix_caching and ea.enforce_eager
    assert ea.reasoning_parser == "deepseek_r1" and ea.cuda_graph_sizes == [64]
    assert ea.hf_overrides == {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}
