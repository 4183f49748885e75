"""Keeps the scheduler's ``vllm.v1.request.Request`` objects of a single-process ``vllm.LLM``.

The scheduler drops a request when it finishes, so a test that wants to read what vLLM's
scheduler saw (``mm_features``, ``prompt_embeds``, ``block_hashes``) records each request as the
scheduler admits it. Needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (the scheduler lives in this process).
"""

from __future__ import annotations


class SchedulerRequests:
    """Records every Request handed to ``llm``'s scheduler, in arrival order (``.seen``).

    Wraps ``Scheduler.add_request`` on that one scheduler instance; :meth:`close` restores it.
    """

    def __init__(self, llm) -> None:
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)
        if core is None:
            raise RuntimeError("SchedulerRequests needs the in-process engine core "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        self._scheduler = core.scheduler
        self._original = self._scheduler.add_request
        self.seen: list = []

        def add_request(request, *args, **kwargs):
            self.seen.append(request)
            return self._original(request, *args, **kwargs)

        self._scheduler.add_request = add_request

    def last(self):
        if not self.seen:
            raise LookupError("the scheduler has admitted no request yet")
        return self.seen[-1]

    def close(self) -> None:
        self._scheduler.add_request = self._original
