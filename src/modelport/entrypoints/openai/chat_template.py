"""Chat templates that do not come from the model: vLLM's ``--chat-template`` (the server's
own, in place of the model's) and a request's ``chat_template``, which is served only with
``--trust-request-chat-template``.

A request's template is the caller's code run by the server: it renders in the same Jinja
sandbox as a model's (frontend/tokenizer.py), but it can still spend the server's CPU, so
vLLM (and this server) take one only when the operator says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelport.entrypoints.openai.errors import OpenAIError


def load_chat_template(value: str) -> str:
    """--chat-template's value: the text of the file it names, else the template itself
    (inline Jinja). ValueError for a name that is neither, or a template that does not
    compile."""
    from modelport.frontend.tokenizer import compile_chat_template

    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {value}: cannot read it: {e}") from None
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"--chat-template {value!r}: no such file, and not an inline Jinja "
                         "template (no '{{' or '{%')")
    try:
        compile_chat_template(text)
    except ValueError as e:
        raise ValueError(f"--chat-template {value if path.is_file() else '(inline)'}: {e}"
                         ) from None
    return text


def request_chat_template(req: Any, trusted: bool) -> str | None:
    """The request's ``chat_template`` to render with (None: the model's or the server's).
    Without --trust-request-chat-template one sent is refused (vLLM's default): using the
    server's template instead would answer a different prompt than asked."""
    template = getattr(req, "chat_template", None)
    if template is None or trusted:
        return template
    raise OpenAIError(
        "Chat template is passed with request, but this server does not take request chat "
        "templates (vLLM's --trust-request-chat-template). Refused request with untrusted "
        "chat template; the model's own template is used when none is sent.",
        400,
        param="chat_template",
    )
