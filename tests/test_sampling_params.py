import pytest

from modelport.engine.messages import EngineCoreRequest, params_to_dict
from modelport.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"n": 0}, "n"),
        ({"n": 10**6}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": -2}, "logprobs"),  # the upper bound is the engine's max_logprobs
        ({"prompt_logprobs": -2}, "prompt_logprobs"),  # -1 is the whole vocabulary
        ({"seed": 2**64}, "seed"),
        ({"stop": [1, 2]}, "stop"),
        ({"stop": 7}, "stop must be a string or a list of strings"),  # was a TypeError
        ({"stop": {"a": 1}}, "stop must be"),  # its keys were taken as stop strings
        ({"stop": ""}, "stop cannot contain an empty string"),  # was dropped silently
        ({"stop": ["x", ""]}, "stop cannot contain an empty string"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 2.5}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
        ({"best_of": 0}, "best_of"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 1.0}, "best_of"),
    ],
)
def test_invalid_values_name_the_field(kw, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_extreme_valid_values_cross_the_process_boundary() -> None:
    import msgspec

    p = SamplingParams(seed=2**63 - 1, n=128, top_k=-1, stop="x", stop_token_ids=[2**31 - 1],
                       repetition_penalty=5.0)  # vLLM takes any positive penalty
    assert p.top_k == 0 and p.stop_strings == ["x"]
    r = EngineCoreRequest(request_id="a", prompt_token_ids=[1], sampling_params=params_to_dict(p),
                          eos_token_ids=[2], arrival_time=0.0)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=EngineCoreRequest)
    assert SamplingParams(**back.sampling_params) == p


def test_child_seeds_stay_in_int64() -> None:
    from modelport.config import ModelConfig, SchedulerConfig
    from modelport.frontend.processor import InputProcessor

    mc = ModelConfig("LlamaForCausalLM", 100, 8, 1, 2, 1, 16)
    proc = InputProcessor(None, mc, SchedulerConfig(max_model_len=64))
    reqs = proc.process("r", [1, 2, 3], SamplingParams(n=3, seed=2**63 - 1, max_tokens=4))
    seeds = [r.sampling_params["seed"] for r in reqs]
    assert seeds == [2**63 - 1, -(2**63), -(2**63) + 1]
    assert [r.request_id for r in reqs] == ["0_r", "1_r", "2_r"]


def test_truncate_prompt_tokens_and_best_of_as_vllm_accepts_them() -> None:
    assert SamplingParams().truncate_prompt_tokens is None and SamplingParams().best_of is None
    assert SamplingParams(truncate_prompt_tokens=1).truncate_prompt_tokens == 1
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1
    assert SamplingParams(n=3, best_of=3).best_of == 3
    with pytest.raises(ValueError, match=r"best_of \(4\) > n \(2\) is not supported"):
        SamplingParams(n=2, best_of=4)


def _processor(max_model_len: int):
    from modelport.config import ModelConfig, SchedulerConfig
    from modelport.frontend.processor import InputProcessor

    mc = ModelConfig("LlamaForCausalLM", 1000, 8, 1, 2, 1, 16)
    return InputProcessor(None, mc, SchedulerConfig(max_model_len=max_model_len))


def test_truncate_prompt_tokens_keeps_the_last_tokens() -> None:
    proc = _processor(64)
    ids = list(range(100))
    keep = proc.prompt_inputs(ids, SamplingParams(truncate_prompt_tokens=5))
    assert keep == (None, [95, 96, 97, 98, 99])
    assert proc.prompt_inputs(ids[:3], SamplingParams(truncate_prompt_tokens=5)) == (None, [0, 1, 2])
    assert proc.prompt_inputs(ids, SamplingParams(truncate_prompt_tokens=-1))[1] == ids[-64:]
    assert proc.prompt_inputs(ids, SamplingParams())[1] == ids  # None: no truncation
    assert proc.prompt_inputs(
        {"prompt_token_ids": ids, "prompt": "p"}, SamplingParams(truncate_prompt_tokens=2)
    ) == ("p", [98, 99])
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens \(65\) is greater than max_model_len"):
        proc.prompt_inputs(ids, SamplingParams(truncate_prompt_tokens=65))


def test_async_llm_generate_truncates_too() -> None:
    import asyncio
    from types import SimpleNamespace

    from modelport.engine.async_llm import AsyncLLM

    sent = []
    proc = _processor(64)
    cfg = SimpleNamespace(model_config=proc.model_config, served_model_name="m",
                          scheduler_config=SimpleNamespace(max_model_len=64), max_logprobs=20)
    client = SimpleNamespace(ready=None, add_requests=sent.extend)

    async def send():
        llm = AsyncLLM(cfg, None, client, asyncio.get_running_loop())
        params = SamplingParams(max_tokens=4, truncate_prompt_tokens=5)
        return llm.generate(list(range(100)), params, "r")

    stream = asyncio.run(send())
    assert stream.prompt_ids == sent[0].prompt_token_ids == [95, 96, 97, 98, 99]


def test_minus_one_logprobs_are_the_whole_vocabulary_as_vllm() -> None:
    from modelport.frontend.processor import check_max_logprobs

    p = SamplingParams(logprobs=-1, prompt_logprobs=-1)
    assert (p.logprobs, p.prompt_logprobs) == (-1, -1)
    with pytest.raises(ValueError, match=r"^logprobs must be non-negative or -1, got -2\.$"):
        SamplingParams(logprobs=-2)
    # vLLM's processor: -1 counts as the vocabulary's size; max_logprobs=-1 is no cap
    with pytest.raises(ValueError, match=r"^Requested sample logprobs of 100, which is greater "
                                         r"than max allowed: 20$"):
        check_max_logprobs(p, 20, 100)
    with pytest.raises(ValueError, match="Requested prompt logprobs of 100"):
        check_max_logprobs(SamplingParams(prompt_logprobs=-1), 99, 100)
    check_max_logprobs(p, -1, 100)
    check_max_logprobs(SamplingParams(logprobs=100, prompt_logprobs=0), -1, 100)
    with pytest.raises(ValueError, match="greater than max allowed: 100"):
        check_max_logprobs(SamplingParams(logprobs=101), -1, 100)
    check_max_logprobs(SamplingParams(logprobs=0, prompt_logprobs=0), 0, 100)
