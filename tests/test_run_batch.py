"""vLLM's run-batch: `modelport run-batch -i in.jsonl -o out.jsonl --model PATH` runs an
OpenAI Batch API file through the OpenAI server's app in process: one output line per input
line, in order, in vLLM's BatchRequestOutput shape; refused requests and malformed lines get
their error lines and the rest still run. CPU, a tiny random Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_llama_dir

ENGINE = ["--served-model-name", "tiny", "--max-model-len", "128", "--kv-cache-memory", "2MiB",
          "--block-size", "4", "--enforce-eager"]  # fmt: skip
CHATS = ["hi", "tell me a story", "héllo wörld", "1 2 3"]
PROMPTS = ["hello", "the quick brown fox", "abc", "zz top"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("rb") / "m")


def line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def chat_body(text: str) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def completion_body(prompt: str) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}


def read_out(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines()]


def assert_refused(out: dict, status: int = 400) -> None:
    assert out["id"].startswith("vllm-") and len(out["id"]) > len("vllm-")
    resp = out["response"]
    assert resp["status_code"] == status and resp["body"] is None
    assert resp["request_id"].startswith("vllm-batch-")
    assert out["error"]


def test_cli_runs_a_file_in_order_with_per_line_errors(model_dir, tmp_path) -> None:
    lines = [line(f"chat-{i}", "/v1/chat/completions", chat_body(t)) for i, t in enumerate(CHATS)]
    lines += [line(f"cmpl-{i}", "/v1/completions", completion_body(p))
              for i, p in enumerate(PROMPTS)]
    lines += [
        "",  # blank: skipped, as vLLM
        line("bad", "/v1/completions", {**completion_body("x"), "max_tokens": -1}),
        line("nowhere", "/v1/images/generations", {"prompt": "x"}),
        "this is not json",
        line("streamed", "/v1/chat/completions", {**chat_body("hi"), "stream": True}),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}),
        line("no-such-model", "/v1/completions", {**completion_body("x"), "model": "other"}),
        line("embed", "/v1/embeddings", {"model": "tiny", "input": "hello"}),  # generate model
        line("last", "/v1/completions", completion_body(PROMPTS[0])),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dst = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "modelport.entrypoints.cli", "run-batch", "-i", str(src),
         "-o", str(dst), "--model", str(model_dir), *ENGINE],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Running batch" in proc.stderr  # the progress bar
    outs = read_out(dst)
    want_ids = [json.loads(s).get("custom_id") if s.startswith("{") else None
                for s in lines if s]  # fmt: skip
    assert [o["custom_id"] for o in outs] == want_ids
    by_id = {o["custom_id"]: o for o in outs}

    # the successes: vLLM's shape around the server's own response
    from modelport import LLM, SamplingParams

    llm = LLM(str(model_dir), max_model_len=128, kv_cache_memory=2 << 20, block_size=4,
              enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want_chat = [o.outputs[0].text for o in llm.chat(
        [[{"role": "user", "content": t}] for t in CHATS], params, use_tqdm=False)]
    want_cmpl = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    del llm
    for i in range(len(CHATS)):
        o = by_id[f"chat-{i}"]
        assert o["error"] is None and o["id"].startswith("vllm-")
        assert o["response"]["status_code"] == 200
        assert o["response"]["request_id"].startswith("vllm-batch-")
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["choices"][0]["message"]["content"] == want_chat[i]
        assert body["usage"]["completion_tokens"] == MAX_TOKENS
    for i in range(len(PROMPTS)):
        body = by_id[f"cmpl-{i}"]["response"]["body"]
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == want_cmpl[i]
    assert by_id["last"]["response"]["body"]["choices"][0]["text"] == want_cmpl[0]
    assert len({o["id"] for o in outs}) == len(outs)  # fresh ids

    # refused by the endpoint: its status, and its OpenAI error body as "error" (vLLM's)
    bad = by_id["bad"]
    assert_refused(bad, 400)
    assert bad["error"]["error"]["type"] == "invalid_request_error"
    assert bad["error"]["error"]["param"] == "max_tokens"
    assert_refused(by_id["no-such-model"], 404)
    assert by_id["no-such-model"]["error"]["error"]["type"] == "not_found_error"
    assert_refused(by_id["embed"], 400)
    assert "Embeddings" in by_id["embed"]["error"]["error"]["message"]
    # refused before any endpoint: 400 and a message (vLLM's make_error_request_output)
    assert_refused(by_id["nowhere"])
    assert by_id["nowhere"]["error"].startswith("URL /v1/images/generations was used.")
    assert by_id["streamed"]["error"] == "Request must not be sent in stream mode"
    assert_refused(by_id["nobody"])
    assert "body" in by_id["nobody"]["error"]
    assert_refused(by_id[None])
    assert "not valid JSON" in by_id[None]["error"]


def test_requests_run_concurrently_and_embeddings(model_dir, tmp_path, monkeypatch) -> None:
    """In process (`cli.main`), an embedding model (--task embed): the lines reach the app
    together (the engine batches them), embeddings come back, chat is the server's 400."""
    from modelport.entrypoints import cli
    from modelport.entrypoints.openai import api_server

    seen = {"now": 0, "max": 0}
    attach = api_server.attach

    def counting_attach(app, *a, **kw):
        service = attach(app, *a, **kw)

        @app.middleware("http")
        async def count(request, call_next):
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            try:
                return await call_next(request)
            finally:
                seen["now"] -= 1

        return service

    monkeypatch.setattr(api_server, "attach", counting_attach)
    texts = ["hello", "world", "hello", "abc", "a longer sentence here", "x"]
    lines = [line(f"e{i}", "/v1/embeddings", {"model": "tiny", "input": t})
             for i, t in enumerate(texts)]
    lines.append(line("chat", "/v1/chat/completions", chat_body("hi")))
    lines.append(line("score", "/v1/score", {"model": "tiny", "text_1": "a", "text_2": "b"}))
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    rc = cli.main(["run-batch", "-i", str(src), "-o", str(dst), "--model", str(model_dir),
                   *ENGINE, "--task", "embed", "--log-level", "warning"])
    assert rc == 0
    outs = read_out(dst)
    assert [o["custom_id"] for o in outs] == [f"e{i}" for i in range(len(texts))] + ["chat",
                                                                                      "score"]
    assert seen["max"] >= 2, seen
    vecs = []
    for o in outs[: len(texts)]:
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
        vecs.append(body["data"][0]["embedding"])
    assert len(vecs[0]) == 64 and vecs[0] == pytest.approx(vecs[2], abs=1e-5)
    assert vecs[0] != vecs[1]
    assert_refused(outs[-2], 400)
    assert "Chat Completions" in outs[-2]["error"]["error"]["message"]
    assert outs[-1]["error"] is None and outs[-1]["response"]["body"]["data"][0]["object"] == "score"


def test_unreadable_input_unwritable_output_missing_model(model_dir, tmp_path, capsys) -> None:
    from modelport.entrypoints.openai import run_batch

    src = tmp_path / "in.jsonl"
    src.write_text(line("a", "/v1/completions", completion_body("x")) + "\n")
    cases = [
        (["-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o1"),
          "--model", str(model_dir)], "cannot read the input file"),
        (["-i", str(src), "-o", str(tmp_path / "no" / "dir" / "o2"), "--model", str(model_dir)],
         "cannot write the output file"),
        (["-i", str(src), "-o", str(tmp_path / "o3"), "--model", str(tmp_path / "nomodel")],
         "not found"),
        (["-i", str(src), "-o", str(tmp_path / "o4"), "--model", str(model_dir),
          "--enable-metrics"], "--enable-metrics"),
    ]  # fmt: skip
    for argv, msg in cases:
        assert run_batch.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "modelport run-batch:" in err and msg in err, err
    assert not (tmp_path / "o3").exists()  # a failed run leaves no empty output behind
