"""The tiny Llava-shaped model (SigLIP + Llama) on the real vLLM CPU engine, without kvbm.

PaliGemma always puts its one image at offset 0; Llava replaces each ``<image>`` token where it
stands, so this model gives kvbm's tests an image in the middle of a long prompt and several
images in one prompt. These tests prove both work and that the output follows each image.
"""

from __future__ import annotations

import pytest

from kvbm.testing.vllm_guard import vllm_marks
from support import tiny_vlm as tv

pytestmark = vllm_marks()

MAX_TOKENS = 8
N_IMAGE = tv.image_tokens_per_image()
BLOCK = tv.BLOCK_SIZE


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from kvbm.testing.vllm_runner import close_llm
    from support.scheduler_requests import SchedulerRequests
    from vllm import LLM

    model_dir = tv.write_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    tv.install_pixtral_stub()
    tv.register_llava_in_process()
    llm = LLM(**tv.engine_kwargs(model_dir, images_per_prompt=2))
    requests = SchedulerRequests(llm)
    yield llm, requests
    requests.close()
    close_llm(llm)


def _generate(engine, prompt):
    from vllm import SamplingParams

    llm, requests = engine
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, detokenize=False, ignore_eos=True)
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    return list(out.outputs[0].token_ids), out, requests.last()


def test_image_in_the_middle_of_a_long_prompt(engine):
    """Text (10 blocks), the image, text (20 blocks): the blocks before the image are shared by
    two images, the outputs are not."""
    before, after = tv.text_tokens(60, 10 * BLOCK), tv.text_tokens(61, 20 * BLOCK)
    a, out_a, req_a = _generate(engine, tv.interleaved_prompt([before, tv.make_image(62), after]))
    b, out_b, req_b = _generate(engine, tv.interleaved_prompt([before, tv.make_image(63), after]))
    a2, out_a2, _ = _generate(engine, tv.interleaved_prompt([before, tv.make_image(62), after]))
    assert out_a.prompt_token_ids == out_b.prompt_token_ids
    assert len(out_a.prompt_token_ids) == len(before) + N_IMAGE + len(after)
    (feature,) = req_a.mm_features
    assert (feature.mm_position.offset, feature.mm_position.length) == (len(before), N_IMAGE)
    assert a != b and a == a2
    # vLLM's own cache: B hits only the text before the image, A's repeat hits every full block.
    assert out_b.num_cached_tokens == len(before)
    # (vLLM always computes the last prompt token, so a full-length hit stops one block short.)
    assert out_a2.num_cached_tokens == (len(out_a2.prompt_token_ids) - 1) // BLOCK * BLOCK
    assert req_a.mm_features[0].identifier != req_b.mm_features[0].identifier


def test_two_images_in_one_prompt(engine):
    t1, t2, t3 = tv.text_tokens(70, 40), tv.text_tokens(71, 50), tv.text_tokens(72, 30)
    x, y, z = tv.make_image(73), tv.make_image(74), tv.make_image(75)
    a, out_a, req = _generate(engine, tv.interleaved_prompt([t1, x, t2, y, t3]))
    b, _, _ = _generate(engine, tv.interleaved_prompt([t1, x, t2, z, t3]))
    swapped, _, _ = _generate(engine, tv.interleaved_prompt([t1, y, t2, x, t3]))
    assert [(f.mm_position.offset, f.mm_position.length) for f in req.mm_features] == [
        (len(t1), N_IMAGE), (len(t1) + N_IMAGE + len(t2), N_IMAGE)]
    assert len(out_a.prompt_token_ids) == len(t1) + len(t2) + len(t3) + 2 * N_IMAGE
    # The second image changes the output, and so does the order of the two.
    assert a != b
    assert a != swapped
