"""Render the benchmark's results: a text table, a Markdown table, and a bar chart (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "unsafe": "unsafe (persistent, no checks)",
    "unsafe_again": "unsafe again (A/A control)",
    "django_max_age_0": "Django CONN_MAX_AGE=0",
    "django_health_checks": "Django CONN_HEALTH_CHECKS",
    "freshconn": "freshconn",
}
DRIVER_LABELS = {
    "mysqlclient": "MariaDB / mysqlclient",
    "pymysql": "MariaDB / PyMySQL",
    "psycopg": "PostgreSQL / psycopg 3",
    "psycopg2": "PostgreSQL / psycopg2",
}
HEADERS = (
    "driver",
    "policy",
    "messages/s",
    "ratio",
    "ratio IQR",
    "pings/1k units",
    "lifecycle µs/unit in loop",
    "alone",
    "connects/1k units",
    "client CPU µs/msg",
)
TARGET = 0.97


def _rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for driver, by_policy in results["summary"].items():
        for policy in results["policies"]:
            s = by_policy[policy]
            rows.append(
                (
                    driver,
                    policy,
                    f"{s['rate']:.0f}",
                    f"{s['ratio']:.3f}x",
                    f"{s['ratio_q1']:.3f}-{s['ratio_q3']:.3f}",
                    f"{s['pings_per_1000']:.0f}",
                    f"{s['in_loop_us']:.1f}",
                    f"{s['overhead_us']:.1f}",
                    f"{s['connects_per_1000']:.0f}",
                    f"{s['cpu_us_per_message']:.0f}",
                )
            )
    return rows


def render_table(results: dict[str, Any]) -> str:
    rows = [HEADERS, *_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    m = results["machine"]
    lines.append(
        f"\nmedians of {_rounds(results)} interleaved rounds; ratio = median of per-round rate / unsafe rate, "
        "IQR = its interquartile range; "
        f"{m['cpu_count']} CPUs, load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"
    )
    return "\n".join(lines)


def _rounds(results: dict[str, Any]) -> int:
    return int(next(iter(results["drivers"].values()))["config"]["rounds"]) if results["drivers"] else 0


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * 2 + "---:|" * (len(HEADERS) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    return "\n".join(lines) + "\n"


def render_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drivers = list(results["summary"])
    policies = results["policies"]
    colors = {
        "unsafe": "#9e9e9e",
        "unsafe_again": "#cfcfcf",
        "django_max_age_0": "#e57373",
        "django_health_checks": "#ffb74d",
        "freshconn": "#1e88e5",
    }
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    top = 1.0
    for i, policy in enumerate(policies):
        xs = [d + (i - (len(policies) - 1) / 2) * width for d in range(len(drivers))]
        rows = [results["summary"][drv][policy] for drv in drivers]
        ys = [row["ratio"] for row in rows]
        # Whiskers: the interquartile range of the per-round ratios (how much the machine's noise moved them).
        err = [[y - row["ratio_q1"] for y, row in zip(ys, rows, strict=True)]]
        err.append([row["ratio_q3"] - y for y, row in zip(ys, rows, strict=True)])
        top = max(top, *(row["ratio_q3"] for row in rows))
        bars = ax.bar(
            xs,
            ys,
            width * 0.92,
            label=LABELS[policy],
            color=colors[policy],
            yerr=err if policy != "unsafe" else None,
            error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#616161"},
        )
        for bar, y, row in zip(bars, ys, rows, strict=True):
            ax.annotate(
                f"{y:.2f}" if y >= 0.1 else f"{y:.3f}",
                (bar.get_x() + bar.get_width() / 2, max(y, row["ratio_q3"])),  # above the whisker
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.axhline(1.0, color="#424242", linewidth=0.8)
    ax.axhline(TARGET, color="#1e88e5", linewidth=0.8, linestyle="--", label=f"target {TARGET}x")
    ax.set_xticks(range(len(drivers)), [DRIVER_LABELS.get(d, d) for d in drivers])
    ax.set_ylabel("throughput / unsafe baseline (higher is better)")
    ax.set_ylim(0, min(max(1.15, top + 0.05), 2.0))
    m = results["machine"]
    ax.set_title(
        "One primary-key SELECT per message through the Django ORM\n"
        f"median of {_rounds(results)} interleaved rounds (whiskers: interquartile range), "
        f"{m['cpu_count']} CPUs, load {m['loadavg_start'][0]:.1f}-{m['loadavg_end'][0]:.1f}, {results['date'][:10]}"
        + (" (QUICK smoke run, not a measurement)" if results["quick"] else ""),
        fontsize=10,
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=5, fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
