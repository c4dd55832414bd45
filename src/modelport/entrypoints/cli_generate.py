"""`modelport generate --prompt TEXT`: one completion from the command line, streamed to stdout.

Runs the engine in-process (LLMEngine): for one prompt a second process would only add
start-up time. A sampling flag left out takes the model's generation_config.json default
(``--generation-config``, as the servers do), else this command's own: greedy, so the same
command prints the same text. The generation config's max_new_tokens caps --max-tokens.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from modelport.engine.arg_utils import EngineArgs

    p = sub.add_parser("generate", help="print a completion for a prompt")
    p.add_argument("--prompt", "-p", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    # None: the generation config's default, else _DEFAULTS'. --max-tokens always has a
    # value, which the generation config's max_new_tokens caps (as vLLM's servers cap theirs)
    p.add_argument("--max-tokens", type=int, default=64,
                   help="at most the generation config's max_new_tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (the default, unless the generation config gives one)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run_generate)


# this command's own defaults, where neither the flags nor the generation config give one
_DEFAULTS = {"temperature": 0.0}


def _prompt_ids(engine: object, args: argparse.Namespace, text: str) -> list[int]:
    tok = engine.tokenizer  # type: ignore[attr-defined]
    if not args.chat:
        return list(tok.encode(text, add_special_tokens=True))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(rendered, str):
        return list(tok.encode(rendered, add_special_tokens=False))
    return list(rendered)


def run_generate(args: argparse.Namespace) -> int:
    from modelport.engine.arg_utils import EngineArgs
    from modelport.engine.generation_config import with_sampling_defaults
    from modelport.engine.llm_engine import LLMEngine
    from modelport.sampling_params import SamplingParams

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
             "max_tokens": args.max_tokens}
    rest = {"stop": args.stop, "ignore_eos": args.ignore_eos, "seed": args.seed}
    try:
        # the flags' own values, checked before the model loads
        SamplingParams(**{**_DEFAULTS, **with_sampling_defaults(given, None)}, **rest)
        engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
        picked = with_sampling_defaults(given, engine.config.default_sampling_params)
        params = SamplingParams(**{**_DEFAULTS, **picked}, **rest)
        ids = _prompt_ids(engine, args, text)
        engine.add_request("generate-0", ids, params, output_kind="delta")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finish = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            o = out.outputs[0]
            sys.stdout.write(o.text)
            sys.stdout.flush()
            finish = o.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[finish_reason={finish}]", file=sys.stderr)
    return 0
