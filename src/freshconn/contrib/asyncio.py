"""freshconn for asyncio programs: the event loop's default executor, and the async ORM's thread.

``freshconn.contrib.asyncio.run(main())`` in place of ``asyncio.run(main())``, or, in a loop you run
yourself, ``install()`` at its start and ``close_orm_connections()`` at its end. Then:

- the loop's default executor is a ``freshconn.ThreadPoolExecutor``: every call that runs there
  (``loop.run_in_executor(None, fn)``, ``asyncio.to_thread(fn)``, ``sync_to_async(fn,
  thread_sensitive=False)``) is a unit of work in its thread, on that thread's persistent connection,
  checked after an idle spell; a call whose awaiting task was cancelled still runs to its end there,
  inside its unit. When the loop shuts the executor down (``asyncio.run`` does), each thread closes its
  connections. asyncio's own default executor keeps one unchecked connection per thread, which fails
  after the server's idle limit, and leaves it open after the loop until a garbage collection;
- at the end, the connections of the thread where Django's async ORM and ``sync_to_async(fn)`` run
  (``thread_sensitive=True``: in a plain asyncio program, one thread for the whole process, which
  outlives the loop) are closed there, after any call still running in it, cancelled or not.

Queries of the async ORM are not units by themselves: run them in ``freshconn.aunit_of_work`` or
``freshconn.aeach`` so that they are checked after idle spells too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from asgiref.sync import sync_to_async

from freshconn import ThreadPoolExecutor, UnitOfWork, Using, close_thread_connections

__all__ = ["close_orm_connections", "install", "run"]

T = TypeVar("T")

_close_orm = sync_to_async(close_thread_connections, thread_sensitive=True)


def install(
    loop: asyncio.AbstractEventLoop | None = None, *, max_workers: int | None = None, using: Using = None
) -> ThreadPoolExecutor:
    """Make a new ``freshconn.ThreadPoolExecutor`` the default executor of ``loop`` (default: the running one).

    ``max_workers`` defaults to asyncio's own (``min(32, cpus + 4)``); ``using`` limits the aliases in
    scope of its units. Call it before the loop first uses its default executor. The loop shuts the pool
    down (``asyncio.run`` does, through ``loop.shutdown_default_executor()``; else call
    ``pool.shutdown()``), and each thread then closes its connections.
    """
    UnitOfWork(using)  # a typo'd alias fails here
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="asyncio-freshconn", using=using)
    (loop or asyncio.get_running_loop()).set_default_executor(pool)
    return pool


async def close_orm_connections() -> None:
    """Close the connections of the async ORM's thread, there (after any call still running in it)."""
    await _close_orm()


def run(
    main: Coroutine[Any, Any, T], *, debug: bool | None = None, max_workers: int | None = None, using: Using = None
) -> T:
    """``asyncio.run(main)`` with ``install()`` first and the async ORM thread's connections closed last.

    The closing runs once the loop has finished (its remaining tasks cancelled, its executor shut
    down), so nothing the program left running can open a connection after it.
    """

    async def with_units() -> T:
        try:
            install(max_workers=max_workers, using=using)
        except BaseException:
            main.close()
            raise
        return await main

    try:
        return asyncio.run(with_units(), debug=debug)
    finally:
        # A plain asyncio program's ORM thread is asgiref's, shared by every loop of the process.
        asyncio.run(close_orm_connections())
