"""The OpenAI frontend's plug-in for `modelport serve` (see entrypoints/cli_serve.py)."""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from modelport.entrypoints.openai.api_server import OpenAIService, add_openai_args, attach

# flags owned by the other frontends; asking for any of them (without --model) means
# "serve those, not the embedded default LLM"
_OTHER_FRONTEND_FLAGS = ("model_repository", "model_store", "models", "ts_config")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_openai_args(parser)


def _own_engine(args: argparse.Namespace) -> bool:
    """Load an LLM of our own when --model is given, or when nothing else was asked for."""
    if getattr(args, "model", None):
        return True
    return not any(getattr(args, name, None) for name in _OTHER_FRONTEND_FLAGS)


def wants(args: argparse.Namespace) -> bool:
    # a model repository may hold `llm` models: /v1 serves those too
    return _own_engine(args) or bool(getattr(args, "model_repository", None))


async def build(args: argparse.Namespace, app: FastAPI) -> OpenAIService:
    # Other frontends may share this process: a failed model load is logged and answered
    # with 503s, it does not stop them.
    only_us = not any(getattr(args, name, None) for name in _OTHER_FRONTEND_FLAGS)
    return attach(
        app, args, exit_on_failure=only_us, own_engine=_own_engine(args), all_paths=only_us
    )
