"""The tiny PaliGemma-shaped model on the real vLLM CPU engine, without kvbm.

These tests prove the model is fit for kvbm's multimodal tests: its greedy output depends on
the image, not only on the token ids (two images behind the same text give the same ids and
different outputs), it is deterministic, and vLLM's scheduler sees each image as one
``mm_features`` entry whose identifier is a content hash. See support/tiny_vlm.py for why
PaliGemma and what vLLM does with its prompts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.testing.vllm_guard import vllm_marks
from support import tiny_vlm as tv

pytestmark = vllm_marks()

MAX_TOKENS = 8
N_IMAGE = tv.image_tokens_per_image()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tv.write_tiny_paligemma(tmp_path_factory.mktemp("tiny-vlm")))


@pytest.fixture(scope="module")
def engine(model_dir):
    from kvbm.testing.vllm_runner import close_llm
    from support.scheduler_requests import SchedulerRequests
    from vllm import LLM

    tv.install_pixtral_stub()
    llm = LLM(**tv.engine_kwargs(model_dir))
    requests = SchedulerRequests(llm)
    yield llm, requests
    requests.close()
    close_llm(llm)


def _generate(engine, prompt):
    """(output token ids, RequestOutput, scheduler Request) of one greedy request."""
    from vllm import SamplingParams

    llm, requests = engine
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, detokenize=False, ignore_eos=True)
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    return list(out.outputs[0].token_ids), out, requests.last()


def test_two_images_same_text_same_ids_different_outputs(engine):
    text = tv.text_tokens(10, 20)
    a, out_a, req_a = _generate(engine, tv.image_prompt(tv.make_image(11), text))
    b, out_b, req_b = _generate(engine, tv.image_prompt(tv.make_image(12), text))
    # The crux of issue 27: the token ids are identical, only the image differs.
    assert out_a.prompt_token_ids == out_b.prompt_token_ids
    assert len(out_a.prompt_token_ids) == tv.expanded_prompt_len(len(text))
    assert a != b
    # vLLM's own prefix cache keys the image: no hit for the second.
    assert out_b.num_cached_tokens == 0
    assert req_a.mm_features[0].identifier != req_b.mm_features[0].identifier


def test_same_image_twice_same_output(engine):
    text = tv.text_tokens(20, 20)
    a, _, req_a = _generate(engine, tv.image_prompt(tv.make_image(21), text))
    b, out_b, req_b = _generate(engine, tv.image_prompt(tv.make_image(21), text))
    assert a == b
    # A fresh PIL image with the same pixels: same identifier, and vLLM serves every full block.
    assert req_a.mm_features[0].identifier == req_b.mm_features[0].identifier
    # Every full block before the last prompt token (vLLM always computes that one).
    assert out_b.num_cached_tokens == (len(out_b.prompt_token_ids) - 1) // tv.BLOCK_SIZE * tv.BLOCK_SIZE


def test_image_before_long_text(engine):
    """A 700-token text after the image (PaliGemma always puts the image first): outputs follow
    the image, and a repeat of the same image and text is identical."""
    text = tv.text_tokens(30, 700)
    a, out_a, _ = _generate(engine, tv.image_prompt(tv.make_image(31), text))
    b, _, _ = _generate(engine, tv.image_prompt(tv.make_image(32), text))
    a2, _, _ = _generate(engine, tv.image_prompt(tv.make_image(31), text))
    assert len(out_a.prompt_token_ids) == tv.expanded_prompt_len(700)
    assert a != b
    assert a == a2


def test_request_mm_features(engine, model_dir):
    text = tv.text_tokens(40, 20)
    image = tv.make_image(41)
    _, out, req = _generate(engine, tv.image_prompt(image, text))
    (feature,) = req.mm_features
    assert feature.modality == "image"
    # The placeholder range: <image> * N_IMAGE then <bos>, which is in the range but not embedded.
    assert feature.mm_position.offset == 0
    assert feature.mm_position.length == N_IMAGE + 1
    assert feature.mm_position.get_num_embeds() == N_IMAGE
    ids = out.prompt_token_ids
    assert ids[:N_IMAGE] == [tv.IMAGE_TOKEN_ID] * N_IMAGE
    assert ids[N_IMAGE] == tv.BOS_ID and ids[-1] == tv.NEWLINE_ID
    assert ids[N_IMAGE + 1:-1] == text
    # No LoRA: identifier == mm_hash, a 256-bit blake3 hex digest of model id + pixels.
    assert feature.identifier == feature.mm_hash
    assert len(feature.identifier) == 64 and int(feature.identifier, 16) >= 0
    assert feature.identifier == tv.mm_identifier(image, model_dir)
    print(f"\nprompt tokens per image: {feature.mm_position.length} "
          f"({feature.mm_position.get_num_embeds()} embedded); prompt {len(ids)} tokens; "
          f"mm_features[0]: identifier={feature.identifier} offset={feature.mm_position.offset} "
          f"length={feature.mm_position.length}")


def test_identifier_is_the_same_in_another_process(engine, model_dir):
    """What a second vLLM instance (sharing G4) would compute for the same image."""
    image = tv.make_image(41)
    _, _, req = _generate(engine, tv.image_prompt(image, tv.text_tokens(50, 20)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from support import tiny_vlm as tv; "
            "print(tv.mm_identifier(tv.make_image(41), sys.argv[2]))")
    other = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), model_dir],
                           capture_output=True, text=True, timeout=300, check=True)
    assert other.stdout.strip().splitlines()[-1] == req.mm_features[0].identifier
