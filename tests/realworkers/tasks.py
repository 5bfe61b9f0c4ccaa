"""The task of the Redis-backed frameworks, found by their autodiscovery of ``tasks`` modules.

``rundramatiq`` and ``run_huey`` both import every installed app's ``tasks`` module; which
framework's task this one defines depends on FRESHCONN_TEST_FRAMEWORK.
"""

from __future__ import annotations

from tests.realworkers import framework, record

if framework() == "dramatiq":
    import dramatiq

    @dramatiq.actor(actor_name="record", max_retries=0)
    def record_actor(key: str) -> None:
        record(key)

elif framework() == "huey":
    from huey.contrib.djhuey import db_task

    @db_task(name="record", retries=0)  # type: ignore[untyped-decorator]  # huey has no type hints
    def record_task(key: str) -> None:
        record(key)
