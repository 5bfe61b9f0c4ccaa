"""pytest fixtures for proving that your own worker code survives real connection loss.

Loaded automatically (entry point ``pytest11``, name ``freshconn``) when django-freshconn is
installed; disable with ``-p no:freshconn``. Nothing is imported from Django or freshconn until
a fixture is used, so the plugin costs nothing in a test run that does not use it.

    @pytest.mark.django_db(transaction=True)
    def test_worker_survives_a_kill(freshconn_kill, freshconn_stats):
        handle(message)                  # opens the connection
        freshconn_kill()                 # the server kills it, for real
        handle(message)                  # freshconn discards it and reconnects
        assert freshconn_stats()["discarded"] == 1

Use ``transaction=True``: a test wrapped in one big transaction cannot survive the server
killing its connection (the rollback at teardown would fail).

``pytest --freshconn-chaos`` (``--freshconn-chaos-seed=N``, ``--freshconn-chaos-rate=P``,
``--freshconn-chaos-max=K``) has the server really kill or expire the connection of every test at
random, seeded points (unit starts, between statements of retrying units, between statements of
code under test outside units) and reports at the end which tests did not survive; see
``freshconn._chaos`` and docs/testing.md. Mark a test ``freshconn_no_chaos`` to leave it alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

__all__ = [
    "StatsProbe",
    "freshconn_expire_idle",
    "freshconn_kill",
    "freshconn_stats",
    "pytest_addoption",
    "pytest_configure",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("freshconn", "freshconn: real connection loss in your tests")
    group.addoption(
        "--freshconn-chaos",
        action="store_true",
        default=False,
        help="kill or expire each test's database connection at random unit starts and between statements "
        "(real KILL / pg_terminate_backend), and report which tests did not survive",
    )
    group.addoption(
        "--freshconn-chaos-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of --freshconn-chaos (default: a random one, printed): the same seed strikes the same points",
    )
    group.addoption(
        "--freshconn-chaos-rate",
        type=float,
        default=0.25,
        metavar="P",
        help="probability that --freshconn-chaos strikes at each strike point (default 0.25)",
    )
    group.addoption(
        "--freshconn-chaos-max",
        type=int,
        default=3,
        metavar="K",
        help="at most K strikes per test (default 3)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "freshconn_no_chaos: --freshconn-chaos leaves this test alone")
    if not config.getoption("freshconn_chaos"):
        return
    rate = config.getoption("freshconn_chaos_rate")
    most = config.getoption("freshconn_chaos_max")
    if not 0.0 <= rate <= 1.0:
        raise pytest.UsageError(f"--freshconn-chaos-rate must be between 0 and 1, got {rate}")
    if most < 1:
        raise pytest.UsageError(f"--freshconn-chaos-max must be at least 1, got {most}")
    seed = config.getoption("freshconn_chaos_seed")
    if seed is None:
        seed = random.SystemRandom().randrange(1, 1_000_000)
    from ._chaos import ChaosPlugin

    config.pluginmanager.register(ChaosPlugin(seed, rate, most), "freshconn-chaos")


class StatsProbe:
    """``freshconn.stats()`` seen from a test: counters since the fixture reset them."""

    def __call__(self, alias: str = "default") -> dict[str, int]:
        """The counters of ``alias``, every counter present (zero when nothing happened yet)."""
        from ._stats import COUNTERS, stats

        return {**dict.fromkeys(COUNTERS, 0), **stats().get(alias, {})}

    def all(self) -> dict[str, dict[str, int]]:
        """Every alias's counters, as ``freshconn.stats()`` returns them."""
        from ._stats import stats

        return stats()

    def reset(self) -> None:
        """Set every counter back to zero (for a test with two phases)."""
        from ._stats import reset_stats

        reset_stats()


@pytest.fixture
def freshconn_kill() -> Callable[..., int]:
    """``freshconn_kill(alias="default")``: the server kills this thread's connection on ``alias``.

    Runs ``KILL`` / ``pg_terminate_backend`` from a second session and returns once the server
    has let go; returns the killed session's id. The connection must be open (run a query first).
    """
    from .testing import kill_connection

    return kill_connection


@pytest.fixture
def freshconn_expire_idle() -> Callable[..., int]:
    """``freshconn_expire_idle(alias="default")``: the server drops this thread's connection for idleness.

    Lowers the session's own idle limit to about a second and waits until the server closed it,
    as ``wait_timeout`` / ``idle_session_timeout`` do after a night without messages.
    """
    from .testing import expire_idle

    return expire_idle


@pytest.fixture
def freshconn_stats() -> StatsProbe:
    """Resets ``freshconn.stats()`` before the test and returns a probe: ``freshconn_stats("default")``."""
    probe = StatsProbe()
    probe.reset()
    return probe
