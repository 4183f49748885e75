"""Blocks stored through the vLLM-shaped path of the core (a Leader and a Worker over per-layer
tensors [blocks, 2, tokens, heads, head_dim], as vLLM's FlashAttention/FlashInfer backends lay
them out) and read back through the TensorRT-LLM adapter (one pool tensor [blocks, layers, 2,
heads*tokens*head_dim]) are byte-identical where the layouts match, and refused by the layout
fingerprint where they differ. TensorRT-LLM runs through kvbm.testing.trtllm_driver (it needs
CUDA); see test_trtllm_connector.py. SGLang's MHA host pages use the same block format."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvbm import _core  # noqa: E402
from kvbm.errors import FailedPreconditionError  # noqa: E402
from kvbm.testing.trtllm_driver import Engine, Request, make_llm_args  # noqa: E402
from kvbm.trtllm_integration import connector as trt  # noqa: E402
from kvbm.vllm_integration.layout import element_order  # noqa: E402

PAGE, LAYERS, HEADS, HD, NB = 8, 2, 2, 16, 32


def _vllm_core(tmp_path, heads=HEADS):
    env = {"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "64",
           "DYN_KVBM_METRICS": "false"}
    layers = [torch.zeros((NB, 2, PAGE, heads, HD), dtype=torch.float16) for _ in range(LAYERS)]
    w = _core.Worker(env=env, shared_metrics=False)
    w.register_kv_caches([t.data_ptr() for t in layers], [list(t.shape) for t in layers],
                         [list(t.stride()) for t in layers], 2, NB, PAGE,
                         element_order=element_order(list(layers[0].shape), PAGE))  # as the vLLM adapter does
    leader = _core.Leader(PAGE, w.bytes_per_block, env=env, shared_metrics=False)
    w.allocate_tiers(leader.host_blocks, leader.disk_blocks)
    return leader, w, layers


def _store_like_vllm(leader, worker, layers, tokens, blocks):
    """One request the way the vLLM adapter drives the core; the "forward pass" writes random KV."""
    rid = "v"
    leader.add_request(rid, tokens)
    ext, _, _, _ = leader.get_num_new_matched_tokens(rid, 0)
    assert ext == 0
    leader.update_state_after_alloc(rid, blocks, 0)
    leader.on_scheduled(rid, blocks, 0, len(tokens))
    worker.bind_step(leader.build_step_metadata())
    g = torch.Generator().manual_seed(7)
    for t in layers:
        t[blocks] = torch.randn(t[blocks].shape, generator=g).to(torch.float16)
    worker.forward_pass_done()
    assert leader.request_finished(rid) is False
    return {i: [t[b].clone() for t in layers] for i, b in enumerate(blocks)}


def test_vllm_blocks_read_through_trtllm_adapter_are_byte_identical(tmp_path, monkeypatch):
    leader, worker, vllm_layers = _vllm_core(tmp_path)
    prompt = [(i * 37 + 11) % 30000 for i in range(4 * PAGE + 2)]
    stored = _store_like_vllm(leader, worker, vllm_layers, prompt, [3, 9, 4, 20, 21])
    assert worker.tier_block_format.endswith("order=token,head,dim")
    # TensorRT-LLM (FLASHINFER backend: tokens-major chunks) attaches to the same tiers.
    args = make_llm_args(PAGE, attn_backend="FLASHINFER")
    eng = Engine(trt.DynamoKVBMConnectorLeader(args, leader=leader),
                 trt.DynamoKVBMConnectorWorker(args, worker=worker),
                 num_blocks=NB, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HD, tokens_per_block=PAGE,
                 attn_backend="FLASHINFER")
    assert worker.block_format == worker.tier_block_format
    req = Request(1, prompt, max_new_tokens=1)
    eng.add_request(req)
    got = {}
    eng.before_forward = lambda ctx, gen: got.update(
        {i: eng.pool[eng.blocks[1][i]].clone() for i in range(4)}) if req in ctx and not got else None
    eng.run_until_idle()
    assert eng.loaded_tokens[1] == 4 * PAGE
    for i in range(4):
        for layer in range(LAYERS):
            for kv in range(2):
                trt_chunk = got[i][layer, kv].view(PAGE, HEADS, HD)
                vllm_chunk = stored[i][layer][kv]
                assert torch.equal(trt_chunk.view(torch.int16), vllm_chunk.view(torch.int16)), (i, layer, kv)


@pytest.mark.parametrize("backend,heads,why", [("TRTLLM", HEADS, "order=head,token,dim"),
                                               ("FLASHINFER", 4, "inner=64")])
def test_different_layouts_are_refused_by_fingerprint(tmp_path, backend, heads, why):
    leader, worker, vllm_layers = _vllm_core(tmp_path)
    prompt = list(range(100, 100 + 3 * PAGE + 1))
    _store_like_vllm(leader, worker, vllm_layers, prompt, [0, 1, 2])
    args = make_llm_args(PAGE, attn_backend=backend)
    w = trt.DynamoKVBMConnectorWorker(args, worker=worker)
    pool = torch.zeros((NB, LAYERS, 2, heads * PAGE * HD), dtype=torch.float16)
    with pytest.raises(FailedPreconditionError, match="layout fingerprint differs") as e:
        w.register_kv_caches(pool)
    assert why in str(e.value)
    # The vLLM-shaped registration still stands: its blocks stay served to it.
    assert worker.block_format == worker.tier_block_format
