"""The tiny Llama (kvbm.testing.tiny_model) fed prompt embeddings instead of token ids.

With ``enable_prompt_embeds=True`` a request may carry a ``prompt_embeds`` tensor of shape
(prompt_len, hidden_size); vLLM runs the model on those rows directly. Such a request has no
token ids (vLLM's scheduler Request holds ``prompt_token_ids=None`` and zeros in
``all_token_ids``), so two embedding prompts of the same length look identical to anything that
keys on token ids. vLLM's own prefix cache keys each block on a digest of its slice of the
embeddings.
"""

from __future__ import annotations

import os

HIDDEN_SIZE = 256  # kvbm.testing.tiny_model.DEFAULT_CONFIG["hidden_size"]


def engine_kwargs(model_dir: str | os.PathLike, **extra) -> dict:
    """``vllm.LLM`` keyword arguments for the tiny Llama with prompt embeddings enabled (the rest
    as ``kvbm.testing.tiny_model.engine_kwargs``, which takes the same extras, e.g.
    ``kv_connector=True`` or ``gpu_blocks``)."""
    from kvbm.testing.tiny_model import engine_kwargs as llama_kwargs

    return llama_kwargs(model_dir, enable_prompt_embeds=True, **extra)


def random_embeds(seed: int, n: int = 300, hidden: int = HIDDEN_SIZE, std: float = 0.08):
    """A seeded float32 (n, hidden) tensor; std as the tiny Llama's own token embeddings."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g, dtype=torch.float32) * std


def embeds_prompt(embeds) -> dict:
    """A vLLM prompt made of embeddings only."""
    return {"prompt_embeds": embeds}


def generate(llm, prompts: list[dict], max_tokens: int = 8):
    """Greedy outputs (token ids) and RequestOutputs of ``prompts``, one request after another."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
    tokens, outs = [], []
    for p in prompts:
        (o,) = llm.generate([p], sp, use_tqdm=False)
        tokens.append(list(o.outputs[0].token_ids))
        outs.append(o)
    return tokens, outs
