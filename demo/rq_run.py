"""``python -m demo --worker rq``: the same orders as RQ jobs, run by real RQ workers without and with freshconn.

Against a MariaDB whose ``wait_timeout`` is a few seconds and a throwaway Redis, it runs
``demo/manage.py consume_orders --worker rq`` three times as a real subprocess, each time with an
empty table and its own queue: enqueues a batch of ``demo.orders.jobs.write_order`` jobs, waits
until RQ has finished (or failed) them, stays idle past the server's ``wait_timeout``, enqueues a
second batch, waits again, then stops the worker with SIGTERM (RQ's warm shutdown).

- ``plain``: ``rq.SimpleWorker``: jobs run in the worker process, on the persistent connection
  it keeps between jobs. This is the worker that shows the bug.
- ``freshconn``: ``freshconn.contrib.rq.FreshconnSimpleWorker``, otherwise the same.
- ``plain_fork``: RQ's default forking ``rq.Worker``, measured for comparison: the worker process
  never queries, so each work horse opens a connection of its own and exits after one job; no
  connection lives through the idle spell, hence nothing goes stale (a connect per job instead).

Every figure printed comes from that run: rows counted in the table, job outcomes from RQ's
finished and failed job registries, errors from the failed jobs' results, counters from
``freshconn.stats()`` in the worker process (its summary at exit) and in each process that ran a
job (the job's return value), aborted sessions from the server's ``Aborted_clients``.
Exit status 0 when the plain SimpleWorker broke after the idle and the freshconn one did not.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from testbed.redis import Redis
from testbed.servers import DB_NAME

from demo.common import Result, Run, error_lines, freshconn_cell, say, wait_for

JOB = "demo.orders.jobs.write_order"

#: (key in the results, consume_orders --mode, --rq-class, the RQ worker class it runs)
RUNS = (
    ("plain", "plain", "simple", "rq.SimpleWorker"),
    ("freshconn", "freshconn", "simple", "FreshconnSimpleWorker"),
    ("plain_fork", "plain", "fork", "rq.Worker (forking)"),
)


class RQRun(Run[Redis]):
    """Real RQ workers, plain and freshconn's, taking the orders as jobs from a throwaway Redis."""

    noun = "worker"
    stopped = "the workers"
    keys = tuple(key for key, *_ in RUNS)

    @classmethod
    def title(cls, wait_timeout: int) -> str:
        return (
            "freshconn demo: RQ workers writing orders to a MariaDB "
            f"whose wait_timeout is {wait_timeout} s (jobs in a throwaway Redis)"
        )

    @classmethod
    def new_server(cls) -> Redis:
        return Redis()

    def env_extra(self) -> dict[str, str]:
        return {"DEMO_REDIS_URL": self.server.url}

    def server_line(self) -> str:
        return f"Redis on 127.0.0.1:{self.server.port}"

    def aborted_clients(self) -> int:
        """Sessions the server saw end without a proper goodbye (a timeout, or a client gone without quitting)."""
        out = self.db.admin_sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'")
        return int(out.split()[-1])

    def run_mode(self, key: str) -> Result:
        from rq import Queue
        from rq import Worker as RQWorker
        from rq.job import Job
        from rq.registry import FailedJobRegistry, FinishedJobRegistry

        _, mode, rq_class, label = next(run for run in RUNS if run[0] == key)
        queue_name = f"orders-{key.replace('_', '-')}"
        self.db.admin_sql(f"TRUNCATE TABLE {DB_NAME}.orders_order")
        aborted_before = self.aborted_clients()
        client = self.server.client()
        queue = Queue(queue_name, connection=client)
        finished_reg = FinishedJobRegistry(queue=queue)
        failed_reg = FailedJobRegistry(queue=queue)

        worker = self.start_worker(
            key,
            [
                "--worker",
                "rq",
                "--mode",
                mode,
                "--rq-class",
                rq_class,
                "--redis",
                self.server.url,
                "--queue",
                queue_name,
            ],
        )

        def ids(registry: Any, batch: int) -> list[str]:
            prefix = f"{queue_name}-b{batch}-"
            return sorted(i for i in registry.get_job_ids() if i.startswith(prefix))

        def handled(batch: int) -> int:
            return len(ids(finished_reg, batch)) + len(ids(failed_reg, batch))

        def send(batch: int) -> None:
            for i in range(1, self.orders + 1):
                ref = f"{queue_name}-b{batch}-{i:03d}"
                queue.enqueue(JOB, ref=ref, batch=batch, qty=i % 5 + 1, job_id=ref)

        say(f"\n[{key}] manage.py consume_orders --worker rq --mode {mode} --rq-class {rq_class}: {label}")
        try:
            send(1)
            took = wait_for("RQ to run batch 1", lambda: handled(1) >= self.orders, timeout=30, alive=worker.alive)
            say(
                f"[{key}] batch 1: {self.orders} jobs enqueued, {len(ids(finished_reg, 1))} finished, "
                f"{len(ids(failed_reg, 1))} failed after {took:.1f} s"
            )
            self.idle_spell(key)
            send(2)
            took = wait_for("RQ to run batch 2", lambda: handled(2) >= self.orders, timeout=20, alive=worker.alive)
            say(
                f"[{key}] batch 2: {self.orders} jobs enqueued, {len(ids(finished_reg, 2))} finished, "
                f"{len(ids(failed_reg, 2))} failed after {took:.1f} s"
            )
            # RQ's warm shutdown waits for "the current job" when the worker still says busy: a
            # forking worker says so until it has reaped the horse of its last job, which can be
            # after that job shows as finished, and a SIGTERM in that moment leaves it blocked in
            # its queue's BLPOP for minutes. Stop it once it says idle, as an operator would.
            wait_for(
                "the RQ worker to go idle",
                lambda: bool(workers := RQWorker.all(queue=queue)) and all(w.get_state() == "idle" for w in workers),
                timeout=20,
                alive=worker.alive,
            )
            out = worker.stop()

            jobs: dict[str, dict[str, int]] = {}
            failed_errors: Counter[str] = Counter()
            first_failed_error = None
            horse_stats: list[dict[str, Any]] = []
            job_pids: set[int] = set()
            for batch in (1, 2):
                finished, failed = ids(finished_reg, batch), ids(failed_reg, batch)
                jobs[str(batch)] = {"finished": len(finished), "failed": len(failed)}
                for job in Job.fetch_many(failed, connection=client):
                    result = job.latest_result() if job is not None else None
                    text = last_line(result.exc_string if result is not None else None)
                    failed_errors[text] += 1
                    first_failed_error = first_failed_error or text
                for job in Job.fetch_many(finished, connection=client):
                    value = job.return_value() if job is not None else None
                    if isinstance(value, dict):
                        job_pids.add(int(value["pid"]))
                        horse_stats.append(value["freshconn"])
            failed_registry = failed_reg.count
        finally:
            worker.close()
            client.close()
        summary = worker.summary(out)
        return {
            "mode": key,
            "worker_mode": mode,
            "rq_class": rq_class,
            "worker_class": label,
            "sent": {"1": self.orders, "2": self.orders},
            "rows": self.rows(),
            "jobs": jobs,
            "failed_registry": failed_registry,
            "failed_errors": dict(failed_errors),
            "first_failed_error": first_failed_error,
            # Processes that ran a finished job, and freshconn.stats() in each right after its job.
            "job_pids": sorted(job_pids),
            "job_connects": sum_counter(horse_stats, "connects") if rq_class == "fork" else None,
            "aborted_clients": self.aborted_clients() - aborted_before,
            "worker_exit": worker.proc.returncode,
            "worker_pid": worker.proc.pid,
            "worker": summary,
        }

    def problems(self, results: dict[str, Result]) -> list[str]:
        found = []
        for r in results.values():
            found += self.exit_problems(r)
        plain, fresh = results["plain"], results["freshconn"]
        for r in (plain, fresh):
            found += self.batch_one_problems(r)
            if r["failed_registry"] != r["worker"]["errors"]:
                found.append(
                    f"{r['mode']}: RQ's failed job registry holds {r['failed_registry']} jobs, "
                    f"the worker counted {r['worker']['errors']} failures"
                )
        pw = plain["worker"]
        return found + self.claim_problems(
            plain,
            fresh,
            plain_not_broken=None
            if plain["jobs"]["2"]["failed"] >= 1 and pw["first_error_is_disconnect"]
            else f"plain: expected failed jobs with a disconnect error after the idle, got {pw['first_error']!r}",
            fresh_failed=f"freshconn: {fresh['failed_registry']} failed jobs, first: {fresh['first_failed_error']}"
            if fresh["failed_registry"]
            else None,
        )

    def report(self, results: dict[str, Result]) -> None:
        n = self.orders

        def batch(r: Result, b: str) -> str:
            return f"{r['rows'].get(b, 0)}/{n} written, {r['jobs'][b]['failed']} jobs failed"

        def stats(r: Result) -> str:
            return freshconn_cell(r["worker"]["freshconn"], used=r["worker_mode"] != "plain")

        plain, fresh, fork = results["plain"], results["freshconn"], results["plain_fork"]
        self.table(
            plain,
            fresh,
            (plain["worker_class"], fresh["worker_class"]),
            "jobs",
            batch,
            [
                ("RQ failed job registry", f"{plain['failed_registry']} jobs", f"{fresh['failed_registry']} jobs"),
                ("freshconn.stats() (worker)", stats(plain), stats(fresh)),
            ],
        )
        for r in (plain, fresh):
            error_lines(
                f"{r['mode']} worker",
                "first failed job: ",
                "then:             ",
                r["first_failed_error"],
                r["failed_errors"],
            )
        handled = sum(fork["jobs"][b]["finished"] + fork["jobs"][b]["failed"] for b in ("1", "2"))
        horses = [p for p in fork["job_pids"] if p != fork["worker_pid"]]
        say(
            f"\nFor comparison, {fork['worker_class']} without freshconn: {fork['rows']['total']} of {2 * n} written, "
            f"{fork['failed_registry']} jobs failed. Its {handled} jobs ran in {len(horses)} work horses"
        )
        say(
            f"    (processes forked for one job each), which opened {fork['job_connects']} connections between them; "
            f"the worker process itself opened {fork['worker']['freshconn'].get('connects', 0)}."
        )
        say(
            "    RQ ends each horse with os._exit(), so none closes its session: the server counted "
            f"{fork['aborted_clients']} aborted clients\n"
            f"    (with the SimpleWorkers: {plain['aborted_clients']} and {fresh['aborted_clients']}, the session "
            "the server dropped at its wait_timeout)."
        )
        if not fork["failed_registry"] and fork["job_connects"] == handled:
            say("    So it does not get stuck: no connection lives through the idle spell; it pays a connect per job.")

    def success(self, results: dict[str, Result]) -> str:
        plain, fresh = results["plain"], results["freshconn"]
        failed = plain["jobs"]["2"]["failed"]
        return (
            "OK: with rq.SimpleWorker the worker stayed broken after the server dropped its idle connection "
            f"({failed} of {self.orders} later jobs failed);\n"
            f"    with FreshconnSimpleWorker it replaced the connection before the next job and wrote all "
            f"{fresh['rows']['total']} orders, each once."
        )


def last_line(text: str | None) -> str:
    """The exception line of a formatted traceback, without the module path of its class."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return "(no error text)"
    name, sep, rest = lines[-1].partition(": ")
    return f"{name.rsplit('.', 1)[-1]}{sep}{rest}"


def sum_counter(stats: list[dict[str, Any]], counter: str) -> int:
    return sum(int(s.get(counter, 0)) for s in stats)
