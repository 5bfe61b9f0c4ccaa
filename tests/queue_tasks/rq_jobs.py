"""The RQ worker of the integration tests: ``python -m tests.queue_tasks.rq_jobs fork|simple``.

Jobs are ``tests.queue_tasks.record``, enqueued by name. With ``FRESHCONN_TEST_PARENT_QUERY=1``
the worker itself holds an open session while it forks its work horses, and checks at the end
that the session still works.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tests.queue_tasks import integration_enabled, parent_session, redis_client, setup_django


def worker_class(kind: str) -> type[Any]:
    from rq.worker import SimpleWorker, Worker

    from freshconn.contrib.rq import FreshconnSimpleWorker, FreshconnWorker

    if integration_enabled():
        base: type[Any] = FreshconnWorker if kind == "fork" else FreshconnSimpleWorker
    else:
        base = Worker if kind == "fork" else SimpleWorker
    if os.environ.get("FRESHCONN_TEST_PARENT_QUERY") != "1":
        return base

    class ParentWithASession(base):  # type: ignore[misc]  # base is picked at run time: type[Any]
        def work(self, *args: Any, **kwargs: Any) -> Any:
            parent_session("init")
            return super().work(*args, **kwargs)

        def teardown(self, *args: Any, **kwargs: Any) -> Any:
            if not self.is_horse:
                parent_session("shutdown")
            return super().teardown(*args, **kwargs)

    return ParentWithASession


def main() -> None:
    setup_django()
    cls = worker_class(sys.argv[1])
    worker = cls(["default"], connection=redis_client())
    worker.work(logging_level="INFO")


if __name__ == "__main__":
    main()
