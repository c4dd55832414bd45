"""Incremental detokenization: turn a growing list of token ids into stable text deltas.

Why a window and not per-token decoding: a token is not a string. Byte-level BPE tokens can
hold part of a UTF-8 character (an emoji is often 2-4 tokens), and sentencepiece drops the
leading space of the first token of a decode. So each step decodes a short window of ids
twice, with and without the new tokens, and emits the difference:

* the window starts a few tokens back (``prefix_offset``), so the first new token is never
  "first in the decode" and keeps its leading space;
* when the decoded window ends in U+FFFD, the last character is still incomplete: nothing
  is emitted until a later token completes it (an invalid sequence is emitted as U+FFFD
  once later text follows it, exactly as a full decode shows it);
* offsets advance only at clean character boundaries, so concatenated deltas equal one
  decode of all the output ids.
"""

from __future__ import annotations

from modelport.frontend.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens kept in the first window (leading-space context)


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all final output text so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> tuple[str, str]:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        return prefix, full

    def add(self, new_token_ids: list[int]) -> str:
        """Append generated ids; return only the text that became final with them."""
        if not new_token_ids:
            return ""
        self.ids.extend(new_token_ids)
        prefix, full = self._pending()
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character still waiting for its last bytes
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: emit what is held back (an incomplete trailing character
        becomes U+FFFD, as in a full decode). Returns the flushed text."""
        prefix, full = self._pending()
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class NoDetokenizer:
    """SamplingParams(detokenize=False): the text stays empty (vLLM's); token ids only."""

    text = ""

    def add(self, new_token_ids: list[int]) -> str:
        return ""

    def flush(self) -> str:
        return ""
