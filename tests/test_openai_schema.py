"""Property-based fuzzing of every operation in /openapi.json with schemathesis: no 5xx.

Bounded for CI: a few dozen examples per operation, and generation cost capped (a tiny
max_model_len; n and max_tokens clamped) so that valid requests stay fast on two CPU cores.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from helpers.server_proc import start_server, stop_server

EXAMPLES = 20
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    log = tmp_path_factory.mktemp("schema") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "64",
            "--max-num-seqs", "8"]
    proc, url = start_server(argv, log)
    try:
        yield url
    finally:
        stop_server(proc)
    assert "internal error" not in log.read_text(), log.read_text()[-4000:]


def _bound_cost(case) -> None:
    """Keep generation cheap (n <= 2, one new token); every other value passes as drawn.

    A missing max_tokens would mean "up to max_model_len" (chat) or 16 (completions); both are
    valid but slow on CPU, so it is set explicitly.
    """
    body = case.body
    if not isinstance(body, dict) or case.operation.path not in GENERATE_PATHS:
        return
    if _number(body.get("n")) and body["n"] > 2:  # 103.0 is a valid n too
        body["n"] = 2
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None or (_number(value) and value > 1):
            body[key] = 1


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fuzz(op, base: str, failures: list[str], seen: Counter) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy())
    def check(case) -> None:
        _bound_cost(case)
        r = case.call(base_url=base, timeout=60)
        seen[(op.path, r.status_code)] += 1
        if r.status_code >= 500:
            failures.append(f"{op.method.upper()} {op.path} -> {r.status_code}: {r.text[:300]}")

    check()


def test_openapi_fuzz_finds_no_server_errors(base) -> None:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= paths
    failures: list[str] = []
    seen: Counter = Counter()
    for op in operations:
        _fuzz(op, base, failures, seen)
    assert not failures, "\n".join(failures[:10])
    # the fuzzing reached the model, not only the validators
    generated = seen[("/v1/completions", 200)] + seen[("/v1/chat/completions", 200)]
    tokenized = seen[("/tokenize", 200)] + seen[("/detokenize", 200)]
    assert generated > 0 and tokenized > 0, sorted(seen.items())
    assert httpx.get(f"{base}/health").status_code == 200
