"""Calibration text written by the model itself (`modelport quantize --calib-from-model`).

For a user with no sample of their traffic, text the model samples from its own distribution
is a better calibration set than an unrelated document: the activations it produces are
those the model reaches on the text it writes (the data-free idea of LLM-QAT, Liu et al.
2023). A chat model (its tokenizer has a chat template) answers requests that vary the kind
of writing and the subject; a base model continues a random token of its vocabulary. Sampling
at temperature 0.8, top-p 0.95, each request seeded, so a run is reproducible.

Measured on SmolLM2-135M-Instruct (bench/README.md, "Quality"): GPTQ W4 g64 with zero points
calibrated on this module's answers (`--num-samples 64`: 87 answers with the top-ups) scores
perplexity 41.0 on the shipped prose (39.2 with a first generator of 64 answers), against
43.6 when calibrated on this repo's technical docs and 41.4 for plain rounding; AWQ 38.3
against 39.0.
"""

from __future__ import annotations

import gc
import logging
import random

logger = logging.getLogger(__name__)

KINDS = ("Write a short story about", "Write an essay about", "Describe",
         "Write a letter to a friend about", "Explain to a student", "Write a news report about",
         "Give advice about", "Write a dialogue between two people about")
SUBJECTS = ("history", "cooking", "a city at night", "the ocean", "friendship", "science",
            "music", "a long journey", "animals", "the weather", "sports", "a garden", "money",
            "a school", "trains", "the moon", "a family holiday", "computers", "medicine",
            "a small business", "mountains", "a library", "an old photograph", "the law")
TEMPERATURE = 0.8
TOP_P = 0.95
MAX_ROUNDS = 3  # answers that stop early are topped up with new requests, at most this often


def generate_calibration(model: str, num_samples: int, seq_len: int, device: str = "cpu",
                         seed: int = 0, progress: bool = False) -> list[str]:
    """About ``num_samples`` x ``seq_len`` tokens of text sampled from ``model`` (an HF folder),
    as a list of texts (one per answer); ``progress``: a bar per round of requests."""
    from modelport import LLM, SamplingParams
    from modelport.loader import load_model_config, resolve_model

    # room for the prompt, within the model's context (a prompt plus max_tokens past it
    # generates up to max_model_len offline, so a short-context model still writes its texts)
    limit = load_model_config(resolve_model(model)).max_position_embeddings
    llm = LLM(model=model, device=device, max_model_len=min(seq_len + 64, limit), seed=seed,
              max_num_seqs=min(64, num_samples))
    tok = llm.get_tokenizer()
    vocab = min(tok.vocab_size, llm.llm_engine.config.model_config.vocab_size)
    rng = random.Random(seed)
    prompts = [(k, s) for k in KINDS for s in SUBJECTS]
    rng.shuffle(prompts)
    texts: list[str] = []
    tokens, target, asked = 0, num_samples * seq_len, 0
    for _ in range(MAX_ROUNDS):
        want = num_samples if asked == 0 else max(1, -(-(target - tokens) * asked // max(tokens, 1)))
        params = [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=seq_len,
                                 seed=seed * 1_000_003 + asked + i) for i in range(want)]
        if tok.chat_template:
            convs = [[{"role": "user", "content": "{} {}.".format(*prompts[(asked + i) % len(prompts)])}]
                     for i in range(want)]
            outs = llm.chat(convs, params, use_tqdm=progress)
        else:
            starts = [[rng.randrange(vocab)] for _ in range(want)]
            outs = llm.generate(prompt_token_ids=starts, sampling_params=params,
                                use_tqdm=progress)
        asked += want
        for o in outs:
            texts.append(o.outputs[0].text)
            tokens += len(o.outputs[0].token_ids)
        logger.info("calibration from the model: %d answers, %d tokens so far", len(texts), tokens)
        if tokens >= target:
            break
    # free the engine (its KV cache, CUDA graphs) before the quantizer loads the float model
    llm.llm_engine.core.shutdown()
    del llm
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return [t for t in texts if t.strip()]
