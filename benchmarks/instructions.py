"""Instructions per unit, counted by callgrind: the per-message cost without the machine's noise.

    python -m benchmarks.instructions --driver D --out FILE [--units N] [--idle-aliases 20] [--redis-url URL]
    (DATABASES entry as JSON on stdin; benchmarks.runner starts it under valgrind, see ``command()``)

Wall-clock ratios on a shared 2-core machine move by a few percent between identical policies (the
A/A control); an instruction count does not depend on what else runs. Each case runs ``units``
messages of one policy's loop in that policy's worker thread, inside ``sys.call_tracing``, which
callgrind is told to use as its on/off switch (``--toggle-collect``) and dump point
(``--dump-after``): one dump per case, holding only that case's instructions. A case runs twice
(its repeat is an A/A control for the count itself). The client's instructions only: the
server's work, the kernel's (the system calls, poll() among them) and cache misses are not counted.
That is what the wall-clock tables and their client CPU column are for.

Under callgrind everything runs ~50x slower, so freshconn's clock-based choices are fixed per case:
``busy`` skips the socket poll (as a unit right after the previous one would), ``poll`` runs it
(as after any pause).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Any

#: (case, policy, kind, poll threshold: None = the policy's own, units as a multiple of --units).
#: "queries_no_unit" runs the queries on freshconn's connection without units: the statement hook
#: alone. "alone" runs units with no query (cheap, so ten times as many).
Case = tuple[str, str, str, float | None, int]
CASES: tuple[Case, ...] = (
    ("unsafe", "unsafe", "loop", None, 1),
    ("unsafe_again", "unsafe_again", "loop", None, 1),
    ("django_health_checks", "django_health_checks", "loop", None, 1),
    ("freshconn_busy", "freshconn", "loop", math.inf, 1),
    ("freshconn_poll", "freshconn", "loop", 0.0, 1),
    ("freshconn_hook_only", "freshconn", "queries_no_unit", None, 1),
    ("freshconn_alone_busy", "freshconn", "alone", math.inf, 10),
    ("freshconn_alone_poll", "freshconn", "alone", 0.0, 10),
)
REDIS_CASES: tuple[Case, ...] = (
    ("redis_unsafe", "unsafe", "redis", None, 1),
    ("redis_freshconn", "freshconn", "redis", None, 1),
)
#: Under the cache simulation (twice as slow): the loop's cases only.
CACHE_CASES: tuple[Case, ...] = (
    ("unsafe", "unsafe", "loop", None, 1),
    ("unsafe_again", "unsafe_again", "loop", None, 1),
    ("django_health_checks", "django_health_checks", "loop", None, 1),
    ("freshconn_busy", "freshconn", "loop", math.inf, 1),
    ("freshconn_poll", "freshconn", "loop", 0.0, 1),
    ("freshconn_hook_only", "freshconn", "queries_no_unit", None, 1),
)
#: With idle aliases configured, what must not grow with them (and Django's, which does).
ALIASES_CASES: tuple[Case, ...] = (
    ("unsafe", "unsafe", "loop", None, 1),
    ("django_health_checks", "django_health_checks", "loop", None, 1),
    ("freshconn_busy", "freshconn", "loop", math.inf, 1),
    ("freshconn_alone_busy", "freshconn", "alone", math.inf, 10),
)


def command(
    out_dir: str, python: str, args: list[str], module: str = "benchmarks.instructions", cache_sim: bool = False
) -> list[str]:
    """The valgrind command line that runs ``module`` with one callgrind dump per case.

    ``cache_sim``: also simulate the caches (first-level instruction and data, last level), which
    is what makes the same code cost several times more in the loop (after the ORM evicted it)
    than in a tight loop; about twice as slow.
    """
    return [
        "valgrind",
        "--tool=callgrind",
        *(["--cache-sim=yes"] if cache_sim else []),
        "--collect-atstart=no",
        "--toggle-collect=sys_call_tracing",
        "--dump-after=sys_call_tracing",
        "--compress-strings=no",
        "--compress-pos=no",
        f"--callgrind-out-file={os.path.join(out_dir, 'cg.out')}",
        python,
        "-m",
        module,
        *args,
    ]


_EVENTS = re.compile(r"^events:\s+(.*)$", re.MULTILINE)
_TOTAL = re.compile(r"^(?:summary|totals):\s+(.*)$", re.MULTILINE)


def read_dumps(out_dir: str) -> list[dict[str, int]]:
    """Event totals of the numbered dumps (cg.out.1, cg.out.2, ...), in order: {"Ir": n, ...}.

    Ir = instructions executed; with the cache simulation also I1mr/D1mr/D1mw (first-level misses:
    instruction fetch, data read, data write) and ILmr/DLmr/DLmw (last-level misses).
    """
    numbered = []
    for path in glob.glob(os.path.join(out_dir, "cg.out.*")):
        suffix = path.rsplit(".", 1)[1]
        if suffix.isdigit():
            numbered.append((int(suffix), path))
    totals = []
    for _, path in sorted(numbered):
        with open(path) as fh:
            text = fh.read()
        events, total = _EVENTS.search(text), _TOTAL.search(text)
        names = events.group(1).split() if events else ["Ir"]
        values = [int(v) for v in total.group(1).split()] if total else []
        values += [0] * (len(names) - len(values))  # callgrind leaves out trailing zeros
        totals.append(dict(zip(names, values, strict=True)))
    return totals


def estimated_cycles(events: dict[str, float]) -> float:
    """KCachegrind's cycle estimate: Ir + 10 x first-level misses + 100 x last-level misses."""
    l1 = events.get("I1mr", 0) + events.get("D1mr", 0) + events.get("D1mw", 0)
    ll = events.get("ILmr", 0) + events.get("DLmr", 0) + events.get("DLmw", 0)
    return events.get("Ir", 0) + 10 * l1 + 100 * ll


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("--driver", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--units", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--idle-aliases", type=int, default=0)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--cache-cases", action="store_true", help="the cases run under the cache simulation")
    args = parser.parse_args(argv)

    from benchmarks.child import Bench, configure, select_driver, wire_freshconn_for_its_worker_only
    from benchmarks.worker import Worker

    db = json.loads(sys.stdin.read())
    select_driver(args.driver)
    configure(db, args.idle_aliases)
    bench = Bench(args.driver)
    bench.create_table()
    wire_freshconn_for_its_worker_only()
    bench.conn.close()
    if args.cache_cases:
        cases = CACHE_CASES
    else:
        cases = ALIASES_CASES if args.idle_aliases else CASES + (REDIS_CASES if args.redis_url else ())
    workers: dict[str, Worker] = {}
    for case in cases:
        policy = case[1]
        if policy not in workers:
            workers[policy] = Worker(policy, args.redis_url)
    order: list[dict[str, Any]] = []
    try:
        # Warm-up, not counted (outside sys.call_tracing): connections, caches, the interpreter's specialisation.
        for _, policy, kind, threshold, _ in cases:
            w = workers[policy]
            w.call(_warm, w, kind, threshold)
        for rep in range(args.repeats):
            for name, policy, kind, threshold, mult in cases:
                w = workers[policy]
                res = w.call(w.counted, kind, args.units * mult, threshold)
                order.append({"case": name, "repeat": rep, **res})
    finally:
        for w in workers.values():
            w.stop()
    with open(args.out, "w") as fh:
        json.dump({"driver": args.driver, "idle_aliases": args.idle_aliases, "cases": order}, fh, indent=1)
    return 0


def _warm(w: Any, kind: str, threshold: float | None) -> None:
    """The same work as a counted case, once, outside the marker (so nothing here is counted)."""
    real = sys.call_tracing
    sys.call_tracing = lambda fn, args: fn(*args)
    try:
        w.counted(kind, 50, threshold)
    finally:
        sys.call_tracing = real


if __name__ == "__main__":
    raise SystemExit(main())
