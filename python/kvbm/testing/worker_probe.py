"""Reads kvbm's worker-side state inside vLLM's worker processes (tensor parallelism).

With ``tensor_parallel_size > 1`` vLLM runs each rank's worker in its own process, so the worker
connectors are not visible from the engine process. ``llm.collective_rpc(worker_state)`` runs
``worker_state`` in every worker process (vLLM pickles the function by reference: this module
must be importable there) and returns one dict per rank.
"""

from __future__ import annotations

import os


def worker_state(vllm_worker=None) -> dict:
    """This process's kvbm worker connector: pid, rank, sizing and transfer counters.

    ``vllm_worker`` is vLLM's worker object (collective_rpc passes it); unused.
    """
    from kvbm.vllm_integration.connector import live_connectors

    workers = live_connectors("worker")
    out: dict = {"pid": os.getpid(), "num_worker_connectors": len(workers)}
    if not workers:
        return out
    c = workers[-1]
    c.worker.wait_idle()
    out.update(
        rank=c.rank,
        world_size=c.world_size,
        bytes_per_block=int(c.bytes_per_block),
        host_blocks=int(c.worker.host_blocks),
        disk_blocks=int(c.worker.disk_blocks),
        device_blocks=int(c.worker.device_blocks),
        layout=c.worker.layout,
        metrics=dict(c.worker.metrics()),
    )
    return out
