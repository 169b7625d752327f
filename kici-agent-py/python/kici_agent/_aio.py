"""Runs what an ``async def`` step function returned: a fresh event loop per step, on the
step's own thread. When the step is cancelled, the coroutine's task is cancelled
(``asyncio.CancelledError`` is raised inside it)."""

import asyncio
from typing import Any, Awaitable

from kici_agent._native import Cancellation


def run(awaitable: Awaitable[Any], cancelled: Cancellation) -> Any:
    """Runs ``awaitable`` to completion and returns its result."""
    return asyncio.run(_until_done_or_cancelled(awaitable, cancelled))


async def _until_done_or_cancelled(awaitable: Awaitable[Any], cancelled: Cancellation) -> Any:
    step = asyncio.ensure_future(awaitable)
    # The blocking wait runs on a worker thread; releasing it below lets that thread finish.
    watcher = asyncio.ensure_future(asyncio.to_thread(cancelled.wait))
    try:
        await asyncio.wait((step, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            step.cancel()
        return await step
    finally:
        cancelled._release()
        await watcher
