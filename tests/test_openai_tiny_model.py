"""`modelport serve --model PATH` with a tiny random Llama built here, whose chat template is
hostile: the template is model-supplied (untrusted) input, so rendering it is sandboxed and a
template that reaches for Python internals fails that request with 400, not the server. The
server's greedy text equals the offline `LLM` on the same folder.
"""

from __future__ import annotations

import httpx
import pytest

from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir

HOSTILE = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")
    (path / "chat_template.jinja").write_text(HOSTILE)
    return path


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("tinysrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(model_dir),
            "--served-model-name", "tiny", "--max-model-len", "64", "--kv-cache-memory", "8MiB"]
    proc, url = start_server(argv, log, timeout=180)
    try:
        yield url
    finally:
        stop_server(proc)


def test_hostile_chat_template_is_the_requests_400(base) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "chat template" in err["message"] and "unsafe" in err["message"]
    assert err["param"] == "messages"
    assert httpx.get(f"{base}/health").status_code == 200


def test_served_path_model_matches_offline_llm(base, model_dir) -> None:
    from modelport import LLM, SamplingParams

    body = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]
    llm = LLM(str(model_dir), max_model_len=64, kv_cache_memory=8 << 20)
    offline = llm.generate(
        ["hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    assert served["text"] == offline.outputs[0].text
    assert r.json()["usage"]["completion_tokens"] == len(offline.outputs[0].token_ids) == 8
    ids = httpx.post(f"{base}/tokenize", json={"prompt": "hello"}).json()["tokens"]
    assert ids == offline.prompt_token_ids
