"""Every request kind served right, on the real vLLM CPU engine: images, prompt embeddings,
prompt logprobs and an input kvbm cannot key.

The image model is the tiny Llava-shaped one of tests/python/support/tiny_vlm.py (SigLIP +
Llama, random weights): Llava puts each image where its ``<image>`` token stands, so a test can
place an image at the start, in the middle of a long prompt, or two in one prompt (PaliGemma,
the other tiny model there, always puts its one image at offset 0). Every request runs after
``reset_prefix_cache()``, so vLLM's own cache (G1) holds nothing and what a request gets from
cache came from kvbm's G2. Each scenario runs on vLLM alone and with kvbm; greedy outputs must
be equal, and kvbm's hits are exactly the blocks that do not depend on a differing input.
"""

from __future__ import annotations

import pytest

from kvbm.testing.vllm_guard import vllm_marks
from support import prompt_embeds as pe
from support import tiny_vlm as tv

pytestmark = vllm_marks()

MAX_TOKENS = 8
BLOCK = tv.BLOCK_SIZE
N_IMAGE = tv.image_tokens_per_image()


def _sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, detokenize=False, ignore_eos=True, **kw)


def _leader():
    from kvbm.vllm_integration.connector import live_connectors

    return live_connectors("scheduler")[-1].leader


class Run:
    """One engine (with or without kvbm); each request after a reset of vLLM's own cache."""

    def __init__(self, llm, with_kvbm: bool):
        self.llm, self.with_kvbm = llm, with_kvbm

    def matched(self) -> int:
        return int(_leader().stats()["matched_tokens"]) if self.with_kvbm else 0

    def generate(self, prompt, **sampling):
        self.llm.reset_prefix_cache()
        before = self.matched()
        (out,) = self.llm.generate([prompt], _sampling(**sampling), use_tqdm=False)
        return out, self.matched() - before


def _scenarios_mm(run: Run) -> dict:
    """The image scenarios, in one order for both engines."""
    res = {}
    text = tv.text_tokens(1, 8 * BLOCK)
    a, b = tv.make_image(2), tv.make_image(3)
    # Same text, two images, the image first: B shares no block with A.
    res["first_a"] = run.generate(tv.interleaved_prompt([a, text]))
    res["first_b"] = run.generate(tv.interleaved_prompt([b, text]))
    # The same image and text again, and with a longer text: kvbm serves A's blocks.
    res["first_a_again"] = run.generate(tv.interleaved_prompt([a, text]))
    res["first_a_longer"] = run.generate(tv.interleaved_prompt([a, text + tv.text_tokens(4, 3 * BLOCK)]))
    # An image in the middle of a long prompt (10 blocks of text before it, 1 token into the
    # 11th block so the image starts inside a block): the blocks before it are shared.
    before, after = tv.text_tokens(5, 10 * BLOCK + 1), tv.text_tokens(6, 12 * BLOCK)
    res["mid_a"] = run.generate(tv.interleaved_prompt([before, a, after]))
    res["mid_b"] = run.generate(tv.interleaved_prompt([before, b, after]))
    res["mid_a_again"] = run.generate(tv.interleaved_prompt([before, a, after]))
    # Two images in one prompt; the second one differs.
    t1, t2 = tv.text_tokens(7, 2 * BLOCK), tv.text_tokens(8, 2 * BLOCK + 5)
    c = tv.make_image(9)
    res["two_ab"] = run.generate(tv.interleaved_prompt([t1, a, t2, b, t1]))
    res["two_ac"] = run.generate(tv.interleaved_prompt([t1, a, t2, c, t1]))
    return res


@pytest.fixture(scope="module")
def mm_results(tmp_path_factory):
    from kvbm.testing.vllm_runner import close_llm, kvbm_env
    from vllm import LLM

    model_dir = tv.write_tiny_llava(tmp_path_factory.mktemp("tiny-llava-kinds"))
    tv.install_pixtral_stub()
    tv.register_llava_in_process()
    out = {}
    for with_kvbm in (False, True):
        kw = tv.engine_kwargs(model_dir, images_per_prompt=2)
        if with_kvbm:
            from vllm.config import KVTransferConfig

            kw["kv_transfer_config"] = KVTransferConfig(
                kv_connector="DynamoConnector", kv_role="kv_both",
                kv_connector_module_path="kvbm.vllm_integration.connector", kv_load_failure_policy="recompute")
        with kvbm_env(DYN_KVBM_CPU_CACHE_GB="0.2", DYN_KVBM_DISK_CACHE_GB=None):
            llm = LLM(**kw)
            try:
                run = Run(llm, with_kvbm)
                # Counters may be shared by every connector of this process: take this run's part.
                before = dict(_leader().metrics()) if with_kvbm else {}
                out[with_kvbm] = _scenarios_mm(run)
                if with_kvbm:
                    after = dict(_leader().metrics())
                    out["metrics"] = {k: after[k] - before[k] for k in after if isinstance(after[k], int)}
            finally:
                close_llm(llm)
    return out


def _tokens(res, key):
    return list(res[key][0].outputs[0].token_ids)


def test_images_outputs_equal_vllm_alone(mm_results):
    alone, kvbm = mm_results[False], mm_results[True]
    for key in alone:
        assert _tokens(kvbm, key) == _tokens(alone, key), key
    # The scenarios can tell wrong KV: different images give different outputs.
    assert _tokens(alone, "first_a") != _tokens(alone, "first_b")
    assert _tokens(alone, "mid_a") != _tokens(alone, "mid_b")
    assert _tokens(alone, "two_ab") != _tokens(alone, "two_ac")


def _full_blocks_but_last(out) -> int:
    return (len(out.prompt_token_ids) - 1) // BLOCK * BLOCK


def test_images_hit_exactly_the_blocks_no_differing_image_shapes(mm_results):
    kvbm = mm_results[True]
    hits = {k: v[1] for k, v in kvbm.items()}
    # The same text with another image at the start: no block is shared.
    assert hits["first_a"] == 0
    assert hits["first_b"] == 0
    # The same image and text: every full block but the one vLLM computes anyway.
    assert hits["first_a_again"] == _full_blocks_but_last(kvbm["first_a_again"][0])
    # A longer text after the same image: A's whole prompt, in full blocks.
    assert hits["first_a_longer"] == len(kvbm["first_a"][0].prompt_token_ids) // BLOCK * BLOCK
    # Image in the middle at offset 10*BLOCK+1: the 10 blocks before its block hit, nothing at
    # or after it when the image differs; everything when it is the same.
    assert hits["mid_a"] == 0
    assert hits["mid_b"] == 10 * BLOCK
    assert hits["mid_a_again"] == _full_blocks_but_last(kvbm["mid_a_again"][0])
    # Two images, the second differs: the blocks before the second image's block hit.
    second = 2 * BLOCK + N_IMAGE + 2 * BLOCK + 5
    assert hits["two_ac"] == second // BLOCK * BLOCK


def test_no_request_was_bypassed_and_no_load_failed(mm_results):
    m = mm_results["metrics"]
    assert m["bypassed_multimodal"] == 0 and m["bypassed_unknown_input"] == 0
    assert m["load_errors"] == 0


# ---------------------------------------------------------------- tiny Llama: embeddings, logprobs


@pytest.fixture(scope="module")
def llama_results(monkeypatch_module):
    from kvbm.testing.vllm_runner import close_llm, kvbm_env, tiny_model_dir
    from kvbm.vllm_integration import request_keys
    from vllm import LLM

    model_dir = tiny_model_dir()
    e1, e2 = pe.random_embeds(11), pe.random_embeds(12)  # 300 x 256, same length
    text = [int(t) for t in tv.text_tokens(13, 5 * BLOCK + 3, vocab_size=2000)]
    out = {}
    for with_kvbm in (False, True):
        with kvbm_env(DYN_KVBM_CPU_CACHE_GB="0.2", DYN_KVBM_DISK_CACHE_GB=None):
            llm = LLM(**pe.engine_kwargs(model_dir, kv_connector=with_kvbm))
            try:
                run = Run(llm, with_kvbm)
                start = dict(_leader().metrics()) if with_kvbm else {}
                res = {}
                res["e1"] = run.generate(pe.embeds_prompt(e1))
                res["e2"] = run.generate(pe.embeds_prompt(e2))
                res["e1_again"] = run.generate(pe.embeds_prompt(e1))
                res["text"] = run.generate({"prompt_token_ids": text})
                res["logprobs"] = run.generate({"prompt_token_ids": text}, prompt_logprobs=2)
                res["logprobs_again"] = run.generate({"prompt_token_ids": text}, prompt_logprobs=2)
                res["text_again"] = run.generate({"prompt_token_ids": text})
                if with_kvbm:
                    before = dict(_leader().metrics())
                    # An input kvbm does not know: as if vLLM had added a kind of extra key
                    # (here cache_salt's, taken out of the kinds kvbm keys).
                    monkeypatch_module.setattr(request_keys, "KNOWN_EXTRA_KEY_KINDS",
                                               request_keys.KNOWN_EXTRA_KEY_KINDS - {"cache_salt"})
                salted = {"prompt_token_ids": text, "cache_salt": "tenant-a"}
                res["unknown"] = run.generate(salted)
                res["unknown_again"] = run.generate(salted)
                if with_kvbm:
                    monkeypatch_module.undo()
                    after = dict(_leader().metrics())
                    out["metrics_delta"] = {k: after[k] - before[k] for k in after if isinstance(after[k], int)}
                    out["metrics"] = {k: after[k] - start[k] for k in after if isinstance(after[k], int)}
                out[with_kvbm] = res
            finally:
                close_llm(llm)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_prompt_embeds_no_wrong_hit(llama_results):
    alone, kvbm = llama_results[False], llama_results[True]
    for key in ("e1", "e2", "e1_again"):
        assert _tokens(kvbm, key) == _tokens(alone, key), key
    assert _tokens(alone, "e1") != _tokens(alone, "e2")
    assert kvbm["e2"][1] == 0  # same length, other content: nothing from e1
    assert kvbm["e1_again"][1] == _full_blocks_but_last(kvbm["e1_again"][0])


def test_prompt_logprobs_equal_and_never_loaded(llama_results):
    alone, kvbm = llama_results[False], llama_results[True]

    def logprobs(res, key):
        out = res[key][0]
        return [None if lp is None else {t: round(v.logprob, 5) for t, v in lp.items()} for lp in out.prompt_logprobs]

    assert kvbm["text_again"][1] == _full_blocks_but_last(kvbm["text_again"][0])  # the text is in G2 ...
    assert kvbm["logprobs"][1] == 0 and kvbm["logprobs_again"][1] == 0  # ... and never loaded for these
    assert _tokens(kvbm, "text_again") == _tokens(alone, "text_again")
    assert logprobs(kvbm, "logprobs_again") == logprobs(alone, "logprobs_again")
    assert logprobs(kvbm, "logprobs") == logprobs(alone, "logprobs")
    assert llama_results["metrics"]["read_skipped_requests"] == 2


def test_an_input_kvbm_cannot_key_is_bypassed_and_counted(llama_results):
    alone, kvbm = llama_results[False], llama_results[True]
    assert _tokens(kvbm, "unknown") == _tokens(alone, "unknown")
    assert _tokens(kvbm, "unknown_again") == _tokens(alone, "unknown_again")
    assert kvbm["unknown_again"][1] == 0  # never stored, so never matched
    assert llama_results["metrics_delta"]["bypassed_unknown_input"] == 2
