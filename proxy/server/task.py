"""stop_task: ending a request's helper task (a body pump) the one careful way."""

from __future__ import annotations

import asyncio


async def stop_task(task: asyncio.Task) -> bool:
    """Cancel a request's helper task (a body pump) if it still runs and wait until it
    has ended; True when it was still running. Its own failure is absorbed (it recorded
    it where the relay looks); a cancellation of the caller propagates."""
    running = not task.done()
    if running:
        task.cancel()
        await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()  # retrieved
    return running
