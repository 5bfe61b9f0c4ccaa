"""freshconn for APScheduler 3.x: jobs run as units of work.

``BackgroundScheduler(executors={"default": FreshconnThreadPoolExecutor(10)})`` (also for
``BlockingScheduler``): a drop-in for APScheduler's ``ThreadPoolExecutor`` (alias ``threadpool``),
built on ``freshconn.ThreadPoolExecutor``:

- every job run happens inside a unit of work in its pool thread: a pool thread keeps its
  connection between runs, checked only after an idle spell (a job every minute against a server
  that drops idle sessions after 30 s simply gets a fresh connection, without an error or a ping);
- when the scheduler shuts down, each pool thread closes its own connections, so none is left open
  on the server.

For a job that runs elsewhere (another executor, a scheduler of its own), decorate the job
function with ``@freshconn.unit_of_work`` instead: same lifecycle, one job at a time.
"""

from __future__ import annotations

from typing import Any

from apscheduler.executors.pool import BasePoolExecutor

from freshconn import ThreadPoolExecutor, Using

__all__ = ["FreshconnThreadPoolExecutor"]


class FreshconnThreadPoolExecutor(BasePoolExecutor):  # type: ignore[misc]  # APScheduler 3 ships no types
    """APScheduler's thread pool executor, with each job run as a unit of work.

    ``max_workers`` and ``pool_kwargs`` as for APScheduler's ``ThreadPoolExecutor``; ``using``
    limits the aliases in scope (default: all).
    """

    def __init__(self, max_workers: int = 10, pool_kwargs: dict[str, Any] | None = None, *, using: Using = None):
        pool = ThreadPoolExecutor(int(max_workers), using=using, **(pool_kwargs or {}))
        super().__init__(pool)
