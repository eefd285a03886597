"""Micro-batching: the rows of /score requests that arrive together are scored in one
onnxruntime call, then split back per request.

Why: a single-row request costs one onnxruntime call, whose fixed overhead (input binding,
thread hand-off) is most of the work for a small model; under concurrent load, one call for the
rows of many requests does the same work once. A request waits at most `window_s` for others
to join (and no longer than the batch ahead of it takes to score, since the next batch
gathers while one is scored).

Per-request errors stay per request: rows are checked before they join a batch (422/413 go to
their own request), and when an onnxruntime call fails for a batch, each request of it is
scored alone so that only the one that fails gets the error. The queue is bounded: past
`max_queue` waiting requests, a request gets 503 with Retry-After at once rather than a
timeout later."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException

from normalcy.scoring import score_outputs
from normalcy.serving.metrics import ServiceMetrics
from normalcy.serving.models import LoadedModel

log = logging.getLogger(__name__)
Outputs = dict[str, np.ndarray]
# A batch of up to this many rows is scored on the event loop: onnxruntime takes well under a
# millisecond for it, less than handing it to a thread and back costs in CPU (GIL hand-offs).
# Larger batches (big requests) go to the batch thread so that they never stall the loop.
INLINE_ROWS = 256


@dataclass
class _Waiting:
    model: LoadedModel
    X: np.ndarray
    names: tuple[str, ...]
    future: asyncio.Future


def split_outputs(outputs: Outputs, sizes: list[int]) -> list[Outputs]:
    """Per-request slices of a batch's outputs, in order (`sizes`: rows of each request)."""
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    return [
        {name: values[start:end] for name, values in outputs.items()}
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def group_by_model(batch: list[_Waiting]) -> list[list[_Waiting]]:
    """Requests that can share one call: the same model snapshot and the same outputs (a
    reload mid-batch, or `anomaly_map` asked by some, splits the batch)."""
    groups: dict[tuple[int, tuple[str, ...]], list[_Waiting]] = {}
    for item in batch:
        groups.setdefault((id(item.model), item.names), []).append(item)
    return list(groups.values())


class MicroBatcher:
    """Gathers checked rows from concurrent requests and scores them together."""

    def __init__(
        self, window_s: float, max_rows: int, max_queue: int, metrics: ServiceMetrics | None
    ) -> None:
        if window_s < 0:
            raise ValueError(f"batch window must be >= 0 ms, got {window_s * 1e3:g}")
        if max_rows < 1 or max_queue < 1:
            raise ValueError(f"batch rows and queue must be >= 1, got {max_rows}, {max_queue}")
        self.window_s = window_s
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: deque[_Waiting] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._waiting:
            if not item.future.done():
                item.future.set_exception(HTTPException(503, detail="the service is stopping"))
        self._executor.shutdown(wait=True)

    async def score(self, model: LoadedModel, X: np.ndarray, names: tuple[str, ...]) -> Outputs:
        """`X`'s outputs, scored with whatever else arrives within the window."""
        if len(self._waiting) >= self.max_queue:
            raise HTTPException(
                status_code=503,
                detail=f"{self.max_queue} requests already wait to be scored "
                "(--batch-queue): retry shortly",
                headers={"Retry-After": "1"},
            )
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(model, X, names, future))
        self._arrived.set()
        return await future

    def _take_batch(self) -> list[_Waiting]:
        """Waiting requests, oldest first, up to `max_rows` rows (at least one request)."""
        batch = [self._waiting.popleft()]
        rows = len(batch[0].X)
        while self._waiting and rows + len(self._waiting[0].X) <= self.max_rows:
            item = self._waiting.popleft()
            batch.append(item)
            rows += len(item.X)
        return batch

    async def _run(self) -> None:
        while True:
            if self._waiting:
                await asyncio.sleep(0)  # let requests already read join this batch
            else:
                self._arrived.clear()
                await self._arrived.wait()
                await asyncio.sleep(self.window_s)
            batch = [item for item in self._take_batch() if not item.future.done()]
            try:
                await self._score_batch(batch)
            except Exception as exc:  # never leave a request waiting for an answer forever
                log.exception("micro-batch failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

    async def _score_batch(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        for group in group_by_model(batch):
            if sum(len(item.X) for item in group) <= INLINE_ROWS:
                results = self._score_group(group)
            else:
                results = await loop.run_in_executor(self._executor, self._score_group, group)
            for item, result in zip(group, results, strict=True):
                if item.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _score_group(self, group: list[_Waiting]) -> list[Outputs | BaseException]:
        """One onnxruntime call for the group; on failure, each request alone."""
        model, names = group[0].model, list(group[0].names)
        sizes = [len(item.X) for item in group]
        if self.metrics is not None:
            self.metrics.batch_rows.observe(sum(sizes))
        try:
            X = group[0].X if len(group) == 1 else np.concatenate([item.X for item in group])
            return split_outputs(score_outputs(model.session, X, names=names), sizes)
        except Exception as exc:
            if len(group) == 1:
                return [exc]
        results: list[Outputs | BaseException] = []
        for item in group:
            try:
                results.append(score_outputs(model.session, item.X, names=names))
            except Exception as exc:  # this request's own failure, reported to it alone
                results.append(exc)
        return results
