"""A tiny Llama written to a local directory, so vLLM runs without the hub or a GPU.

The weights are seeded random normals (std 0.08). Not zeros and not vLLM's ``load_format="dummy"``:
dummy weights give near-uniform logits, so the greedy output ignores the context and a test
that compares outputs could not see wrong KV. With these weights the output depends on the
whole prompt, so a single wrong or stale KV block changes the generated tokens.

Block size 32 everywhere: vLLM's CPU attention backend accepts only multiples of 32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BLOCK_SIZE = 32

DEFAULT_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 2000,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_tiny_llama(directory: str | os.PathLike, *, std: float = 0.08, seed: int = 0, **overrides) -> Path:
    """Writes config.json and model.safetensors into ``directory``; returns its path.

    Idempotent: an existing model with the same config and seed is kept (the weights are a pure
    function of config and seed, so two runs load bit-identical models).
    """
    import torch
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(DEFAULT_CONFIG, **overrides)
    stamp = {"config": cfg, "std": std, "seed": seed}
    stamp_file = path / "kvbm_tiny_model.json"
    weights = path / "model.safetensors"
    if weights.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path

    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    tensors = {
        "model.embed_tokens.weight": normal(vocab, hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": normal(vocab, hidden),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    stamp_file.write_text(json.dumps(stamp))
    return path


GEMMA3_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 2000,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 64,
    "sliding_window": 64,
    # Gemma 3's pattern: five sliding-window layers, then one global layer.
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_tiny_gemma3(directory: str | os.PathLike, *, std: float = 0.08, seed: int = 0, **overrides) -> Path:
    """A Gemma-3-shaped text model (``Gemma3ForCausalLM``): sliding-window and global layers.

    By default five sliding-window layers (window 64 tokens, two 32-token blocks) and one global
    layer, as in Gemma 3, so vLLM's hybrid KV cache manager keeps two KV cache groups' worth of
    layers apart and frees sliding-window blocks that fall out of the window. ``layer_types``
    (one entry per layer) and ``sliding_window`` may be overridden. Same weights rule as
    :func:`write_tiny_llama` (seeded normals, idempotent); Gemma's norms scale by ``1 + w``, so
    their weights are zeros.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(GEMMA3_CONFIG, **overrides)
    if "layer_types" not in overrides and "num_hidden_layers" in overrides:
        n = cfg["num_hidden_layers"]
        cfg["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if len(cfg["layer_types"]) != cfg["num_hidden_layers"]:
        raise ValueError(f"layer_types has {len(cfg['layer_types'])} entries for {cfg['num_hidden_layers']} layers")
    stamp = {"config": cfg, "std": std, "seed": seed}
    stamp_file = path / "kvbm_tiny_model.json"
    weights = path / "model.safetensors"
    if weights.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path

    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    # Gemma scales the embeddings by sqrt(hidden) and ties them to the output head: smaller
    # embeddings keep the first layer's input in the same range as the Llama's.
    tensors = {
        "model.embed_tokens.weight": normal(vocab, hidden) / hidden**0.5 * 4,
        "model.norm.weight": torch.zeros(hidden),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            tensors[p + norm + ".weight"] = torch.zeros(hidden)
        tensors[p + "self_attn.q_norm.weight"] = torch.zeros(head_dim)
        tensors[p + "self_attn.k_norm.weight"] = torch.zeros(head_dim)
        tensors[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    stamp_file.write_text(json.dumps(stamp))
    return path


def prepare_cpu_environment() -> None:
    """Environment vLLM needs for an offline, single-process CPU run; call before importing vllm.

    Single process (VLLM_ENABLE_V1_MULTIPROCESSING=0) puts the scheduler and the worker in this
    process, so tests and the demo can read kvbm's counters from the live connectors.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_kwargs(model_dir: str | os.PathLike, *, gpu_blocks: int | None = None, max_model_len: int = 4096,
                  kv_connector: bool = False, load_failure_policy: str = "recompute", **extra) -> dict:
    """Keyword arguments for ``vllm.LLM`` running the tiny model, with or without kvbm."""
    kw = dict(
        model=str(model_dir),
        load_format="safetensors",
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=64 << 20,
        num_gpu_blocks_override=gpu_blocks,
        seed=0,
    )
    if kv_connector:
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="DynamoConnector",
            kv_role="kv_both",
            kv_connector_module_path="kvbm.vllm_integration.connector",
            kv_load_failure_policy=load_failure_policy,
        )
    kw.update(extra)
    return kw


def write_tiny_tokenizer(directory: str | os.PathLike, vocab_size: int = DEFAULT_CONFIG["vocab_size"]) -> Path:
    """A word-level tokenizer for the tiny model, for servers and clients that need text.

    Token id ``i`` (3 <= i < vocab_size) is a two-character word (:func:`token_word`); words are
    split on whitespace, so :func:`ids_to_text` gives text that is exactly those ids, and decoding
    joins words with spaces. Short words on purpose: vLLM's server refuses a prompt of more than
    5 characters per token of its context before tokenizing it.
    Ids 0, 1 and 2 are ``[UNK]``, ``<s>`` and ``</s>`` (the model's bos and eos). Written as
    ``tokenizer.json`` + ``tokenizer_config.json`` (transformers' PreTrainedTokenizerFast).
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    vocab.update({token_word(i): i for i in range(3, vocab_size)})
    special = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for w, i in (("[UNK]", 0), ("<s>", 1), ("</s>", 2))]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": DEFAULT_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }))
    return path


_WORD_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def token_word(i: int) -> str:
    """The word of token id ``i`` in :func:`write_tiny_tokenizer`'s vocabulary (ids below 62^2)."""
    if not 0 <= i < len(_WORD_CHARS) ** 2:
        raise ValueError(f"token id {i} is outside the tiny tokenizer's range [0, {len(_WORD_CHARS) ** 2})")
    return _WORD_CHARS[i // len(_WORD_CHARS)] + _WORD_CHARS[i % len(_WORD_CHARS)]


def ids_to_text(ids: list[int]) -> str:
    """The text that :func:`write_tiny_tokenizer`'s tokenizer turns back into exactly ``ids``."""
    return " ".join(token_word(i) for i in ids)
