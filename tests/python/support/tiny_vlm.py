"""Tiny random-weight vision-language models for vLLM CPU: PaliGemma-shaped (SigLIP vision tower
+ Gemma LM) and Llava-shaped (the same SigLIP tower + a Llama LM).

Why these two: on this machine's vLLM CPU 0.32 no torchvision matches the CPU torch, and most of
vLLM's VLM modules (llava, qwen2_vl, gemma3_mm, internvl, ...) reach torchvision at import through
transformers' pixtral image processor. paligemma imports without it; llava imports once that one
transformers module is satisfied (:func:`install_pixtral_stub`, and
:func:`register_llava_in_process` for vLLM's registry). Both processors have a PIL backend
(SiglipImageProcessorPil), and SigLIP, Gemma and Llama all run on vLLM's CPU backend.

Where the image goes:
- PaliGemma (vllm/model_executor/models/paligemma.py) *inserts* ``<image> * n + [<bos>]`` at the
  start of the prompt (after ``<bos>`` when the tokenizer's ``add_bos_token`` is true; false
  here) and appends ``"\\n"`` unless the prompt ends with it. So the image is always at offset 0,
  one per prompt, and an ``<image>`` token written inside the prompt stays an ordinary text token.
- Llava (vllm/model_executor/models/llava.py) *replaces* each ``<image>`` token of the prompt by
  ``n`` placeholders: images go anywhere, several per prompt (:func:`interleaved_prompt`). Use it
  for an image in the middle of a long prompt.

Everything is written locally (config.json, model.safetensors, tokenizer, image processor,
processor config) so vLLM runs with ``HF_HUB_OFFLINE=1``. The weights are a pure function of
config and seed.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

BLOCK_SIZE = 32

# Token ids of the tiny vocabulary. The PaliGemma processor adds "<image>" and 1152 location and
# segmentation tokens to its tokenizer; they are in the base vocabulary here, so adding them
# changes nothing and every id stays below vocab_size.
PAD_ID, EOS_ID, BOS_ID, UNK_ID, NEWLINE_ID, IMAGE_TOKEN_ID = 0, 1, 2, 3, 4, 5
_EXTRA_TOKENS = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]
FIRST_WORD_ID = 6 + len(_EXTRA_TOKENS)  # 1158: ids from here to vocab_size-1 are plain words
VOCAB_SIZE = 2048

VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 224,
    "patch_size": 14,  # (224 / 14)^2 = 256 image tokens: 8 blocks of 32
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
    "vision_use_head": False,
}

TEXT_CONFIG = {
    "model_type": "gemma",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}


def image_tokens_per_image(vision_config: dict = VISION_CONFIG) -> int:
    """Placeholder tokens vLLM puts in the prompt for one image: one per SigLIP patch."""
    return (vision_config["image_size"] // vision_config["patch_size"]) ** 2


def _config(vision: dict, text: dict) -> dict:
    return {
        # Without "architectures" vLLM falls back to its Transformers backend, not paligemma.py.
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "image_token_index": IMAGE_TOKEN_ID,
        "vocab_size": text["vocab_size"],
        "projection_dim": text["hidden_size"],
        "hidden_size": text["hidden_size"],
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "vision_config": dict(vision, projection_dim=text["hidden_size"]),
        "text_config": dict(text),
    }


def write_tiny_paligemma(directory: str | os.PathLike, *, seed: int = 0, std: float = 0.08,
                         embed_std: float = 0.01, projector_std: float = 0.02, vision: dict | None = None,
                         text: dict | None = None) -> Path:
    """Writes the model, tokenizer and image processor into ``directory``; returns its path.

    ``embed_std`` is the token embeddings' std. Keep it small: Gemma multiplies them by
    sqrt(hidden) and ties the LM head to them, so large ones make every step repeat the last
    token and the output ignores the image. Idempotent like ``write_tiny_llama``.
    """
    vision = dict(VISION_CONFIG, **(vision or {}))
    text = dict(TEXT_CONFIG, **(text or {}))
    return _write_model("paligemma", directory, vision, text, seed=seed, std=std, embed_std=embed_std,
                        projector_std=projector_std)


def write_tiny_llava(directory: str | os.PathLike, *, seed: int = 0, std: float = 0.08, embed_std: float = 0.08,
                     projector_std: float = 0.02, vision: dict | None = None, text: dict | None = None) -> Path:
    """A Llava-shaped model (the same SigLIP tower, a Llama LM like the tiny Llama, a two-layer
    projector) for what PaliGemma cannot do: vLLM's llava processor *replaces* each ``<image>``
    token of the prompt by the image's placeholders, so images go anywhere, several per prompt.

    vLLM's llava module imports transformers' pixtral processor at import time, so
    :func:`install_pixtral_stub` is needed here too.
    """
    vision = dict(VISION_CONFIG, **(vision or {}))
    text = dict(LLAVA_TEXT_CONFIG, **(text or {}))
    return _write_model("llava", directory, vision, text, seed=seed, std=std, embed_std=embed_std,
                        projector_std=projector_std)


LLAVA_TEXT_CONFIG = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}


def _llava_config(vision: dict, text: dict) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMAGE_TOKEN_ID,
        # SigLIP has no CLS token: "full" keeps every patch, one placeholder per patch.
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "image_seq_length": image_tokens_per_image(vision),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "vision_config": dict(vision),
        "text_config": dict(text),
    }


def _write_model(kind: str, directory, vision: dict, text: dict, *, seed: int, std: float, embed_std: float,
                 projector_std: float) -> Path:
    import torch
    from safetensors.torch import save_file

    if text["vocab_size"] <= FIRST_WORD_ID:
        raise ValueError(f"text vocab_size {text['vocab_size']} leaves no word tokens (first word id {FIRST_WORD_ID})")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    stamp = {"kind": kind, "vision": vision, "text": text, "seed": seed, "std": std, "embed_std": embed_std,
             "projector_std": projector_std, "layout": 2}
    stamp_file = path / "kvbm_tiny_vlm.json"
    weights = path / "model.safetensors"
    if weights.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path

    g = torch.Generator().manual_seed(seed)

    def normal(*shape, s=std):
        return (torch.randn(*shape, generator=g) * s).contiguous()

    vh, vi, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    num_patches = image_tokens_per_image(vision)
    th, ti, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    heads, kv_heads, head_dim = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]

    tensors: dict[str, torch.Tensor] = {}
    v = "vision_tower.vision_model."
    tensors[v + "embeddings.patch_embedding.weight"] = normal(vh, vision["num_channels"], p, p)
    tensors[v + "embeddings.patch_embedding.bias"] = torch.zeros(vh)
    tensors[v + "embeddings.position_embedding.weight"] = normal(num_patches, vh)
    for i in range(vision["num_hidden_layers"]):
        lp = f"{v}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[lp + f"self_attn.{name}.weight"] = normal(vh, vh)
            tensors[lp + f"self_attn.{name}.bias"] = torch.zeros(vh)
        for norm in ("layer_norm1", "layer_norm2"):
            tensors[lp + f"{norm}.weight"] = torch.ones(vh)
            tensors[lp + f"{norm}.bias"] = torch.zeros(vh)
        tensors[lp + "mlp.fc1.weight"] = normal(vi, vh)
        tensors[lp + "mlp.fc1.bias"] = torch.zeros(vi)
        tensors[lp + "mlp.fc2.weight"] = normal(vh, vi)
        tensors[lp + "mlp.fc2.bias"] = torch.zeros(vh)
    tensors[v + "post_layernorm.weight"] = torch.ones(vh)
    tensors[v + "post_layernorm.bias"] = torch.zeros(vh)
    if kind == "paligemma":
        tensors["multi_modal_projector.linear.weight"] = normal(th, vh, s=projector_std)
        tensors["multi_modal_projector.linear.bias"] = torch.zeros(th)
    else:
        tensors["multi_modal_projector.linear_1.weight"] = normal(th, vh, s=projector_std)
        tensors["multi_modal_projector.linear_1.bias"] = torch.zeros(th)
        tensors["multi_modal_projector.linear_2.weight"] = normal(th, th, s=projector_std)
        tensors["multi_modal_projector.linear_2.bias"] = torch.zeros(th)

    # Gemma's RMSNorm scales by (1 + weight), Llama's by weight: both start as the identity.
    norm_one = torch.zeros(th) if kind == "paligemma" else torch.ones(th)
    lm = "language_model.model."
    tensors[lm + "embed_tokens.weight"] = normal(vocab, th, s=embed_std)
    tensors[lm + "norm.weight"] = norm_one.clone()
    if kind == "llava":
        tensors["language_model.lm_head.weight"] = normal(vocab, th)
    for i in range(text["num_hidden_layers"]):
        lp = f"{lm}layers.{i}."
        tensors[lp + "input_layernorm.weight"] = norm_one.clone()
        tensors[lp + "post_attention_layernorm.weight"] = norm_one.clone()
        tensors[lp + "self_attn.q_proj.weight"] = normal(heads * head_dim, th)
        tensors[lp + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, th)
        tensors[lp + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, th)
        tensors[lp + "self_attn.o_proj.weight"] = normal(th, heads * head_dim)
        tensors[lp + "mlp.gate_proj.weight"] = normal(ti, th)
        tensors[lp + "mlp.up_proj.weight"] = normal(ti, th)
        tensors[lp + "mlp.down_proj.weight"] = normal(th, ti)

    config = _config(vision, text) if kind == "paligemma" else _llava_config(vision, text)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    _write_tokenizer(path, vocab, text["max_position_embeddings"])
    _write_processor(path, vision, kind)
    stamp_file.write_text(json.dumps(stamp))
    return path


def _write_tokenizer(path: Path, vocab_size: int, max_len: int) -> None:
    """Word-level tokenizer: ids as in the constants above, word ``i`` is ``w<i>``."""
    special = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID, "<unk>": UNK_ID, "<image>": IMAGE_TOKEN_ID}
    vocab = dict(special)
    vocab["\n"] = NEWLINE_ID
    vocab.update({tok: 6 + i for i, tok in enumerate(_EXTRA_TOKENS)})
    vocab.update({f"w{i}": i for i in range(FIRST_WORD_ID, vocab_size)})
    added = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for w, i in special.items()]
    added.append({"id": NEWLINE_ID, "content": "\n", "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": False})
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        # vLLM's paligemma processor asserts add_bos_token is a bool; false = PaliGemma 2's
        # layout: <image>*n <bos> text "\n".
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }))


def _write_processor(path: Path, vision: dict, kind: str) -> None:
    size = vision["image_size"]
    processor_class = "PaliGemmaProcessor" if kind == "paligemma" else "LlavaProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps({
        # The PIL backend: transformers' torchvision backend cannot load here.
        "image_processor_type": "SiglipImageProcessorPil",
        "processor_class": processor_class,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "image_seq_length": image_tokens_per_image(vision),
    }))
    processor = {"processor_class": processor_class}
    if kind == "llava":
        processor.update(patch_size=vision["patch_size"], vision_feature_select_strategy="full",
                         num_additional_image_tokens=0, image_token="<image>")
    (path / "processor_config.json").write_text(json.dumps(processor))


_PIXTRAL_IMAGE_PROCESSOR = "transformers.models.pixtral.image_processing_pixtral"


def install_pixtral_stub() -> bool:
    """Lets vLLM's ``get_vision_encoder_info`` import where torchvision cannot load.

    vllm/model_executor/models/vision.py's get_vision_encoder_info imports vLLM's pixtral module
    (to test ``isinstance(vision_config, PixtralVisionConfig)``), and that module imports
    ``_num_image_tokens`` from transformers' pixtral image processor, whose first line imports
    torchvision. No torchvision matches the CPU torch (PyPI's is built for CUDA torch and fails to
    register its operators), so paligemma's processor cannot start. Only ``_num_image_tokens`` is
    taken from that module, and only for Pixtral models, so this puts a module with just that
    function (the same formula: patches per side, rounded up) under the real module's name.

    It is a stub of that one transformers module, not of torchvision: transformers' own
    ``is_torchvision_available`` keeps answering false, so nothing else takes a torchvision path.
    Does nothing when the real module imports (a working torchvision); returns whether the stub
    is in place. Call before vLLM loads a model.
    """
    if _PIXTRAL_IMAGE_PROCESSOR in sys.modules:
        return getattr(sys.modules[_PIXTRAL_IMAGE_PROCESSOR], "_kvbm_stub", False)
    try:
        __import__(_PIXTRAL_IMAGE_PROCESSOR)
        return False
    except ImportError as e:
        if "torchvision" not in str(e):
            raise

    def _num_image_tokens(image_size, patch_size):
        height, width = image_size
        ph, pw = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
        return (height - 1) // ph + 1, (width - 1) // pw + 1

    stub = types.ModuleType(_PIXTRAL_IMAGE_PROCESSOR)
    stub.__doc__ = "kvbm test stub: transformers' pixtral image processor needs torchvision (see tiny_vlm.py)."
    stub._num_image_tokens = _num_image_tokens
    stub._kvbm_stub = True
    sys.modules[_PIXTRAL_IMAGE_PROCESSOR] = stub
    return True


def engine_kwargs(model_dir: str | os.PathLike, *, gpu_blocks: int | None = None, max_model_len: int = 2048,
                  images_per_prompt: int = 1, **extra) -> dict:
    """Keyword arguments for ``vllm.LLM`` running the tiny VLM on CPU (no kvbm; add
    ``kv_transfer_config`` through ``extra``). The tokenizer is loaded: the multimodal processor
    needs it."""
    kw = dict(
        model=str(model_dir),
        load_format="safetensors",
        enforce_eager=True,
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=64 << 20,
        num_gpu_blocks_override=gpu_blocks,
        limit_mm_per_prompt={"image": images_per_prompt},  # PaliGemma takes at most 1
        seed=0,
    )
    kw.update(extra)
    return kw


def make_image(seed: int, size: int = VISION_CONFIG["image_size"]):
    """A deterministic RGB image from ``seed``: smooth colour gradients plus noise, so two
    seeds differ everywhere (and differ after SigLIP's resize and normalisation)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-4, 4, size=3)
        channels.append(np.sin(a * x + b * y + c))
    smooth = (np.stack(channels, axis=-1) + 1) * 0.5
    noisy = np.clip(smooth * 0.8 + rng.uniform(0, 0.2, size=(size, size, 3)), 0, 1)
    return Image.fromarray((noisy * 255).astype(np.uint8), mode="RGB")


def text_tokens(seed: int, n: int, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """``n`` word-token ids (never special, never the image token) drawn from ``seed``."""
    import numpy as np

    return np.random.default_rng(seed).integers(FIRST_WORD_ID, vocab_size, size=n).tolist()


def image_prompt(image, text: list[int]) -> dict:
    """A PaliGemma prompt: ``text`` token ids with one image. vLLM inserts the image's placeholder
    tokens and a ``<bos>`` at the start and a ``"\\n"`` at the end (see the module docstring)."""
    return {"prompt_token_ids": list(text), "multi_modal_data": {"image": image}}


def interleaved_prompt(parts: list) -> dict:
    """A Llava prompt from ``parts``: lists of text token ids and PIL images, in order. Each image
    becomes one ``<image>`` token, which vLLM replaces by the image's placeholders."""
    ids: list[int] = []
    images = []
    for part in parts:
        if isinstance(part, list):
            ids.extend(part)
        else:
            ids.append(IMAGE_TOKEN_ID)
            images.append(part)
    if not images:
        raise ValueError("interleaved_prompt: no image among the parts (use a plain token prompt)")
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}


def expanded_prompt_len(text_len: int, vision_config: dict = VISION_CONFIG) -> int:
    """Prompt tokens vLLM schedules for a PaliGemma :func:`image_prompt` with ``text_len`` text ids."""
    return image_tokens_per_image(vision_config) + 1 + text_len + 1  # image, <bos>, text, "\n"


def mm_identifier(image, model_id: str, algorithm: str = "blake3") -> str:
    """The ``identifier`` vLLM 0.32 gives this image's ``MultiModalFeatureSpec``, computed the
    way vLLM does (vllm/multimodal/processing/inputs.py ``get_mm_hashes``): a digest of the model
    id (``LLM(model=...)``, the path here) and the image's mode and pixels, with no processor
    kwargs, no client-given uuid and no LoRA. A pure function of its inputs: no process state."""
    from vllm.multimodal.hasher import MultiModalHasher

    return MultiModalHasher.hash_kwargs(algorithm, model_id=model_id, image=image)


def register_llava_in_process() -> None:
    """Makes vLLM inspect its llava model class in this process (call after
    :func:`install_pixtral_stub`, before building a Llava engine).

    vLLM's model registry inspects a lazily registered architecture in a fresh Python subprocess
    (``_run_in_subprocess`` in vllm/model_executor/models/registry.py), which imports llava.py
    without the stub and fails on torchvision. Registering the already imported class object
    (the same class vLLM would load) makes the registry inspect it here.
    """
    from vllm import ModelRegistry
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    ModelRegistry.register_model("LlavaForConditionalGeneration", LlavaForConditionalGeneration)
