"""IncrementalDetokenizer: streamed deltas add up to one full decode, never a broken char."""

from __future__ import annotations

import random

import pytest

from helpers.tiny_models import tiny_tokenizer
from modelport.frontend.detokenizer import IncrementalDetokenizer
from modelport.frontend.tokenizer import Tokenizer, load_tokenizer
from modelport.loader import resolve_model

TEXTS = [
    "Hello 世界! 😀🎉 naïve café",
    "日本語のテキストと한국어 🇫🇷🏳️‍🌈 flags",
    "code:  a . b\n\tx = {'k': \"v\"}  # done",
    "Ünïcödé ∑∫√ 𝔘𝔫𝔦 — “quotes” …",
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(resolve_model(None))


def stream(
    tok: Tokenizer,
    prompt: list[int],
    ids: list[int],
    rng: random.Random,
    skip_special_tokens: bool = True,
) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)  # the engine may deliver several tokens per step
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    return deltas, detok


def test_valid_text_streams_exactly(smol: Tokenizer) -> None:
    rng = random.Random(0)
    prompt = smol.encode("Repeat after me:")
    for text in TEXTS:
        ids = smol.encode(" " + text, add_special_tokens=False)
        deltas, detok = stream(smol, prompt, ids, rng)
        assert "".join(deltas) == detok.text == smol.decode(ids) == " " + text
        assert not any("\ufffd" in d for d in deltas)  # partial characters are held back
        assert detok.flush() == ""


def test_multibyte_char_is_held_until_complete(smol: Tokenizer) -> None:
    ids = smol.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # SmolLM2 splits the emoji into byte tokens
    detok = IncrementalDetokenizer(smol, [])
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "😀"


def test_random_token_sequences_match_full_decode(smol: Tokenizer) -> None:
    """Random ids (invalid byte sequences included) and slices of multi-byte text."""
    rng = random.Random(1234)
    special = [0, 1, 2]
    for trial in range(400):
        if trial % 2:
            ids = smol.encode(rng.choice(TEXTS), add_special_tokens=False)
            ids = ids[rng.randrange(len(ids)) :]
            ids += [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(4))]
        else:
            ids = [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(1, 30))]
        if trial % 5 == 0:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        skip = trial % 3 != 0
        prompt = smol.encode(rng.choice(["", "Say:", "日本"]), add_special_tokens=False)
        deltas, detok = stream(smol, prompt, ids, rng, skip)
        tail = detok.flush()
        expected = smol.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == detok.text == expected, (ids, prompt)


def _metaspace_tokenizer() -> Tokenizer:
    """A sentencepiece-style word tokenizer: decode drops the first token's leading space."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "<unk>",
        "</s>",
        "\u2581The",
        "\u2581capital",
        "\u2581is",
        "\u2581Paris",
        "\u2581indeed",
    ]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.decoder = decoders.Metaspace(prepend_scheme="always")
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>"))


def test_leading_space_kept_for_first_output_token(smol: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smol, smol.encode("The capital of France is"))
    assert detok.add(smol.encode(" Paris", add_special_tokens=False)) == " Paris"

    sp = _metaspace_tokenizer()
    prompt = sp.encode("The capital is")
    paris, indeed = sp.encode("Paris"), sp.encode("indeed")
    assert len(paris) == 1 and sp.decode(paris) == "Paris"  # a lone decode drops the space...
    detok = IncrementalDetokenizer(sp, prompt)
    assert detok.add(paris) == " Paris"  # ...the detokenizer keeps it, as in the full text
    assert detok.add(indeed) == " indeed"
    assert sp.decode(prompt + paris + indeed) == "The capital is" + detok.text
    # with no prompt there is nothing before the first token: it decodes like a lone decode
    detok = IncrementalDetokenizer(sp, [])
    assert detok.add(paris) == "Paris"


def test_space_before_partial_char_waits_for_the_char() -> None:
    tok = tiny_tokenizer()
    ids = tok.encode(" é", add_special_tokens=False)  # one token per byte: 20 c3 a9
    detok = IncrementalDetokenizer(tok, tok.encode("a"))
    assert detok.add(ids[:2]) == ""
    assert detok.add(ids[2:]) == " é"
