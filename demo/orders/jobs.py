"""The RQ job of the demo: ``demo.orders.jobs.write_order``, enqueued by name by ``python -m demo --worker rq``."""

from __future__ import annotations

import os
from typing import Any

import freshconn

from .workers import handle_order


def write_order(ref: str, batch: int, qty: int) -> dict[str, Any]:
    """Write one order (the same business logic as the Kafka consumer's); return who wrote it.

    The return value (kept by RQ as the job's result) is the demo's window on the process that
    ran the job: its pid and its ``freshconn.stats()`` right after the write. With RQ's forking
    worker that process is a work horse, whose counters die with it.
    """
    handle_order({"ref": ref, "batch": batch, "qty": qty})
    return {"pid": os.getpid(), "freshconn": freshconn.stats().get("default", {})}
