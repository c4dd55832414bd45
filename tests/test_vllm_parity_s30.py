"""vLLM parity: chat templates from the request or the server, and per-token pooling options.

- ``--trust-request-chat-template``: a request's ``chat_template`` renders the conversation
  (/tokenize and chat completions; /v1/embeddings messages on a pooling server), equal to
  what transformers renders with that template; one that fails to render is a 400 naming
  ``chat_template``; ``--chat-template`` (a file) replaces the model's template for every
  request that sends none; a --chat-template that is neither a file nor a template, or does
  not compile, stops serve;
- ``LLM.chat(chat_template=...)`` renders with the given template;
- ``token_embed`` with ``dimensions`` (matryoshka): each row's first values, normalized,
  offline and on /pooling; vLLM's checks (a non-matryoshka model, a size it does not list);
- /pooling's ``use_activation: false``: token_classify's raw logits (the head's output).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, PoolingParams
from modelport.entrypoints.openai.chat_template import load_chat_template
from test_classify_score import _make_seq_cls

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
# a template unlike any model's, so its output is recognisable
REQ_TEMPLATE = ("{% for m in messages %}<<{{ m.role | upper }}>>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<<BOT>>{% endif %}")
SERVER_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }};{% endfor %}"
SMALL = dict(max_model_len=256, kv_cache_memory=8 << 20, max_num_batched_tokens=32)


def _close(a, b, tol=1e-4) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def _decoder_hidden(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0].float()


# ------------------------------------------------------------------ chat templates


@pytest.fixture(scope="module")
def default_llm():
    return LLM(kv_cache_memory=32 << 20, max_model_len=256)


def _hf_render(tok, template: str, **kw) -> list[int]:
    text = tok.hf.apply_chat_template(MSGS, chat_template=template, tokenize=False, **kw)
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("s30chat")
    (d / "server.jinja").write_text(SERVER_TEMPLATE)
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "256",
            "--kv-cache-memory", "32MiB", "--max-num-seqs", "2",
            "--trust-request-chat-template", "--chat-template", str(d / "server.jinja")]
    with serving(argv, d / "server.log") as url:
        yield url


def test_llm_chat_renders_with_the_given_template(default_llm) -> None:
    from modelport import SamplingParams

    tok = default_llm.get_tokenizer()
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    out = default_llm.chat(MSGS, greedy, chat_template=REQ_TEMPLATE, use_tqdm=False)[0]
    assert out.prompt_token_ids == _hf_render(tok, REQ_TEMPLATE, add_generation_prompt=True)
    assert tok.decode(out.prompt_token_ids).endswith("<<USER>>Hi there\n<<BOT>>")
    own = default_llm.chat(MSGS, greedy, use_tqdm=False)[0]
    assert own.prompt_token_ids == tok.encode(tok.apply_chat_template(MSGS),
                                              add_special_tokens=False)
    assert own.prompt_token_ids != out.prompt_token_ids


def test_request_and_server_chat_templates(chat_server, default_llm) -> None:
    tok = default_llm.get_tokenizer()
    # the request's template, as transformers renders it
    r = _ok(_post(chat_server, "/tokenize", {"messages": MSGS, "chat_template": REQ_TEMPLATE}))
    assert r["tokens"] == _hf_render(tok, REQ_TEMPLATE, add_generation_prompt=True)
    # none sent: --chat-template's, not the model's
    r = _ok(_post(chat_server, "/tokenize", {"messages": MSGS}))
    assert r["tokens"] == _hf_render(tok, SERVER_TEMPLATE, add_generation_prompt=True)
    assert tok.decode(r["tokens"]) == "[system] Be brief.;[user] Hi there;"
    # chat completions render the same prompts (usage counts them)
    body = {"messages": MSGS, "max_tokens": 1, "temperature": 0.0}
    for extra, template in (({"chat_template": REQ_TEMPLATE}, REQ_TEMPLATE),
                            ({}, SERVER_TEMPLATE)):
        r = _ok(_post(chat_server, "/v1/chat/completions", {**body, **extra}))
        want = _hf_render(tok, template, add_generation_prompt=True)
        assert r["usage"]["prompt_tokens"] == len(want)
    # Responses (no chat_template of its own): the server's template
    r = _ok(_post(chat_server, "/v1/responses", {"input": "Hi there", "max_output_tokens": 1}))
    assert r["usage"]["input_tokens"] == len(tok.encode("[user] Hi there;",
                                                        add_special_tokens=False))


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m.content }", "unexpected"),  # does not compile
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),  # the sandbox refuses it
])
def test_a_request_template_that_fails_is_a_400_naming_it(chat_server, template, words) -> None:
    for path, body in (("/tokenize", {"messages": MSGS}),
                       ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 1})):
        err = _error(_post(chat_server, path, {**body, "chat_template": template}))
        assert err["param"] == "chat_template", err
        assert "chat_template" in err["message"] and words in err["message"], err
    _ok(_post(chat_server, "/tokenize", {"messages": MSGS}))  # still serving


def test_chat_template_flag_values(tmp_path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(SERVER_TEMPLATE)
    assert load_chat_template(str(f)) == SERVER_TEMPLATE
    assert load_chat_template(SERVER_TEMPLATE) == SERVER_TEMPLATE  # inline
    with pytest.raises(ValueError, match="no such file, and not an inline Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    f.write_text("{% if %}")
    with pytest.raises(ValueError, match=r"t\.jinja: chat template error \(line 1\)"):
        load_chat_template(str(f))
    # serve stops before it starts an engine
    from fastapi import FastAPI

    from modelport.entrypoints.openai.api_server import attach, make_parser

    args = make_parser().parse_args(["--chat-template", str(f)])
    assert isinstance(args, argparse.Namespace)
    with pytest.raises(SystemExit, match="modelport serve: --chat-template"):
        attach(FastAPI(), args, exit_on_failure=True)


# ------------------------------------------------------------------ per-token pooling


@pytest.fixture(scope="module")
def mrl_dir(tmp_path_factory):
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("s30mrl") / "mrl")
    cfg = json.loads((path / "config.json").read_text())
    cfg["matryoshka_dimensions"] = [16, 32]
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_token_embed_dimensions_offline(mrl_dir, tmp_path) -> None:
    llm = LLM(str(mrl_dir), runner="pooling", **SMALL)
    o = llm.encode("hello token world", PoolingParams(dimensions=16, task="token_embed"),
                   use_tqdm=False)[0]
    h = _decoder_hidden(mrl_dir, o.prompt_token_ids)
    assert o.outputs.data.shape == (len(o.prompt_token_ids), 16)
    _close(o.outputs.data, F.normalize(h[:, :16], dim=-1))
    raw = llm.encode("hello token world",
                     PoolingParams(dimensions=32, normalize=False, task="token_embed"),
                     use_tqdm=False)[0]
    _close(raw.outputs.data, h[:, :32])
    with pytest.raises(ValueError, match=r"only supports \[16, 32\] matryoshka dimensions"):
        llm.encode("x", PoolingParams(dimensions=8, task="token_embed"), use_tqdm=False)
    with pytest.raises(ValueError, match="use_activation is only for classification tasks"):
        llm.encode("x", PoolingParams(use_activation=False, task="token_embed"),
                   use_tqdm=False)
    del llm
    plain = make_tiny_llama_dir(tmp_path / "plain")
    llm = LLM(str(plain), runner="pooling", **SMALL)
    with pytest.raises(ValueError, match="does not support matryoshka representation"):
        llm.encode("x", PoolingParams(dimensions=16, task="token_embed"), use_tqdm=False)


def test_server_token_embed_dimensions_and_request_template(mrl_dir, tmp_path_factory) -> None:
    from transformers import AutoTokenizer

    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(mrl_dir),
            "--served-model-name", "mrl", "--runner", "pooling", "--max-model-len", "256",
            "--kv-cache-memory", "8MiB", "--trust-request-chat-template"]
    tok = AutoTokenizer.from_pretrained(mrl_dir, local_files_only=True)
    with serving(argv, tmp_path_factory.mktemp("s30mrlsrv") / "server.log") as url:
        r = _ok(_post(url, "/pooling", {"input": "hello token world", "task": "token_embed",
                                        "dimensions": 32}))
        h = _decoder_hidden(mrl_dir, tok.encode("hello token world"))
        _close(r["data"][0]["data"], F.normalize(h[:, :32], dim=-1))
        err = _error(_post(url, "/pooling", {"input": "x", "task": "token_embed",
                                             "dimensions": 8}))
        assert err["param"] == "dimensions" and "[16, 32]" in err["message"]
        err = _error(_post(url, "/pooling", {"input": "x", "use_activation": False}))
        assert err["param"] == "use_activation" and "embed task" in err["message"]
        # messages through the request's template (this model has none of its own)
        text = tok.apply_chat_template(MSGS, chat_template=REQ_TEMPLATE, tokenize=False)
        r = _ok(_post(url, "/v1/embeddings", {"messages": MSGS, "chat_template": REQ_TEMPLATE,
                                              "dimensions": 16}))
        h = _decoder_hidden(mrl_dir, tok.encode(text, add_special_tokens=False))
        _close(r["data"][0]["embedding"], F.normalize(h[-1, :16], dim=-1))
        err = _error(_post(url, "/v1/embeddings", {"messages": MSGS,
                                                   "chat_template": "{{ 1 / 0 }}"}))
        assert err["param"] == "chat_template" and "division by zero" in err["message"]


def test_server_pooling_use_activation_gives_the_heads_logits(tmp_path_factory) -> None:
    from transformers import AutoTokenizer

    path, ref = _make_seq_cls(tmp_path_factory.mktemp("s30cls") / "cls", 3)
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(path),
            "--served-model-name", "tiny", "--max-model-len", "256",
            "--kv-cache-memory", "8MiB", "--trust-request-chat-template"]
    text = "classify every token here"
    ids = AutoTokenizer.from_pretrained(path, local_files_only=True).encode(text)
    with torch.no_grad():
        logits = ref.model(torch.tensor([ids])).last_hidden_state[0].float() \
            @ ref.score.weight.float().T
    with serving(argv, tmp_path_factory.mktemp("s30clslog") / "server.log") as url:
        raw = _ok(_post(url, "/pooling", {"input": text, "task": "token_classify",
                                          "use_activation": False}))
        _close(raw["data"][0]["data"], logits)
        act = _ok(_post(url, "/pooling", {"input": text, "task": "token_classify",
                                          "use_activation": True}))
        _close(act["data"][0]["data"], torch.softmax(logits, dim=-1))
        err = _error(_post(url, "/pooling", {"input": text, "task": "token_classify",
                                             "dimensions": 16}))
        assert err["param"] == "dimensions" and "token_classify" in err["message"]
        # /classify's messages through the request's template (the model has none)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        rendered = tok.apply_chat_template(MSGS, chat_template=REQ_TEMPLATE, tokenize=False)
        ids = tok.encode(rendered, add_special_tokens=False)
        with torch.no_grad():
            last = ref.model(torch.tensor([ids])).last_hidden_state[0, -1].float() \
                @ ref.score.weight.float().T
        r = _ok(_post(url, "/classify", {"messages": MSGS, "chat_template": REQ_TEMPLATE}))
        assert r["usage"]["prompt_tokens"] == len(ids)
        _close(r["data"][0]["probs"], torch.softmax(last, dim=-1))
        err = _error(_post(url, "/classify", {"messages": MSGS, "chat_template": "{{ 1 / 0 }}"}))
        assert err["param"] == "chat_template" and "division by zero" in err["message"]
