"""The tiny Llama on the real vLLM CPU engine with ``enable_prompt_embeds``, without kvbm.

Proves the embedding-prompt workload kvbm's tests need: two random embedding prompts of the same
length (300 x hidden) have identical token-id views in vLLM's scheduler and different greedy
outputs, and a repeat of the same embeddings gives the same output.
"""

from __future__ import annotations

import pytest

from kvbm.testing.vllm_guard import vllm_marks
from support import prompt_embeds as pe

pytestmark = vllm_marks()

LENGTH = 300
BLOCK = 32


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from kvbm.testing.tiny_model import write_tiny_llama
    from kvbm.testing.vllm_runner import close_llm
    from support.scheduler_requests import SchedulerRequests
    from vllm import LLM

    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    llm = LLM(**pe.engine_kwargs(model_dir, disable_log_stats=False))
    requests = SchedulerRequests(llm)
    yield llm, requests
    requests.close()
    close_llm(llm)


def test_two_embedding_prompts_of_equal_length_differ(engine):
    llm, requests = engine
    (a, b), (out_a, out_b) = pe.generate(llm, [pe.embeds_prompt(pe.random_embeds(s, LENGTH)) for s in (1, 2)])
    req_a, req_b = requests.seen[-2:]
    assert a != b
    # Same length, no token ids: the scheduler's token view of the two is identical.
    assert req_a.prompt_token_ids is None and req_b.prompt_token_ids is None
    assert list(req_a.all_token_ids[:LENGTH]) == list(req_b.all_token_ids[:LENGTH]) == [0] * LENGTH
    assert req_a.num_prompt_tokens == LENGTH
    assert tuple(req_a.prompt_embeds.shape) == (LENGTH, pe.HIDDEN_SIZE)
    # vLLM's prefix cache keys the embeddings: the second gets no hit.
    assert out_b.num_cached_tokens == 0
    assert req_a.block_hashes[0] != req_b.block_hashes[0]
    print(f"\nprompt_embeds {req_a.prompt_embeds.dtype} {tuple(req_a.prompt_embeds.shape)}; "
          f"prompt_token_ids={req_a.prompt_token_ids}; all_token_ids[:4]={list(req_a.all_token_ids[:4])}")


def test_same_embeddings_twice_same_output(engine):
    llm, _ = engine
    embeds = pe.random_embeds(3, LENGTH)
    (a, b), (_, out_b) = pe.generate(llm, [pe.embeds_prompt(embeds), pe.embeds_prompt(embeds.clone())])
    assert a == b
    assert out_b.num_cached_tokens == (LENGTH - 1) // BLOCK * BLOCK
