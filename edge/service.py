"""The live edge on one asyncio loop: sources feed the pipeline, a batching tick runs the models,
sinks publish. bleak, the MQTT client and the replays all live on this loop (DESIGN.md).

Each source runs as its own task and feeds frames as they come (they are checked and queued);
the tick runs the detector over every queued frame (one array operation per rate and frame
length) and one model batch over every stream's ready beats every ``tick_s``, so a stream never
waits on another stream's input, and the detector and the models see large batches under load.
A model refresh (``Anonymizer.swap_models``, called on this loop) takes effect between ticks: no
batch ever mixes two models.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Sequence

from edge.frames import Sink, SourceEvent
from edge.pipeline import Anonymizer, StepOutput

log = logging.getLogger(__name__)


def tune_collector() -> None:
    """Keep the garbage collector's passes out of the ticks, where every beat waiting for a tick
    waits for them too.

    What is alive at start (modules, models, sessions: it lives as long as the process) is frozen
    out of the full passes, which walk every tracked object; with 1,000 streams one took about
    100 ms. The first generation's threshold goes from 700 to 10,000 net new container objects:
    the pipeline frees almost everything it makes by reference counting within a tick, so at the
    default the collector ran about 30 times a second for nothing, 3 % of the CPU at 900 streams
    with full passes of 50-70 ms among them; at 10,000 it ran 6-40 times in such a run instead
    of 650-790, and never a full pass (measured with ``ecg-edge bench``, docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


class EdgeService:
    """Runs sources into one Anonymizer and its output into sinks."""

    def __init__(self, anonymizer: Anonymizer, sinks: Sequence[Sink], tick_s: float = 0.02) -> None:
        self.anonymizer = anonymizer
        self.sinks = list(sinks)
        self.tick_s = tick_s
        self._pending = StepOutput()
        self._lock = asyncio.Lock()

    async def _publish(self, out: StepOutput) -> None:
        for sink in self.sinks:
            for info in out.started:
                await sink.session_started(info)
            if out.frames or out.beats:
                await sink.emit(out.frames, out.beats)
            for info in out.ended:
                await sink.session_ended(info)

    async def _consume(self, source: AsyncIterator[SourceEvent]) -> None:
        async for event in source:
            out = self.anonymizer.handle(event)
            if out:
                async with self._lock:  # a session end flushes its stream now
                    await self._publish(out)

    async def _tick(self) -> None:
        """Step every ``tick_s`` on a fixed schedule: the wait is what is left of the period after
        the step and its publishing, so under load the edge does not idle while frames queue (a
        late step is followed by the next at once, after the sources have had their turn)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.tick_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            async with self._lock:
                out = self.anonymizer.step()
                if out:
                    await self._publish(out)
            next_at = max(next_at + self.tick_s, loop.time())

    async def run(self, sources: Sequence[AsyncIterator[SourceEvent]], stop_when_sources_end: bool = True) -> None:
        """Run until every source ends (replays, tests) or forever (live sources); close sessions."""
        tune_collector()
        ticker = asyncio.create_task(self._tick(), name="edge-tick")
        tasks = [asyncio.create_task(self._consume(s), name=f"edge-source-{i}") for i, s in enumerate(sources)]
        try:
            if stop_when_sources_end:
                await asyncio.gather(*tasks)
            else:
                await asyncio.Event().wait()
        finally:
            for t in [*tasks, ticker]:
                await _stop(t)
            async with self._lock:
                await self._publish(self.anonymizer.close())


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel until the task is done: on Python 3.11, ``asyncio.wait_for`` (inside aiomqtt) can
    swallow a cancellation that arrives together with its result."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
