"""pytest --freshconn-chaos on a user's own suite, run by pytester against the real test server."""

from __future__ import annotations

import re

import pytest

from tests.conftest import subprocess_env

pytestmark = pytest.mark.server
pytest_plugins = ("pytester",)

WORKER = '''
"""The code under test: a worker's message handler, with freshconn and without."""
import freshconn
from django.db import transaction

from tests.app.models import Order


@freshconn.unit_of_work(retries=3)
def handle(ref):
    with transaction.atomic():
        Order.objects.filter(ref=ref).exists()
        Order.objects.create(ref=ref)


def handle_naively(ref):
    Order.objects.filter(ref=ref).exists()
    Order.objects.create(ref=ref)
'''

USER_TESTS = """
import pytest

import worker
from tests.app.models import Order


@pytest.mark.django_db(transaction=True)
def test_worker_with_freshconn():
    for i in range(6):
        worker.handle(f"f-{i}")
    assert Order.objects.count() == 6


@pytest.mark.django_db(transaction=True)
def test_naive_worker():
    for i in range(6):
        worker.handle_naively(f"n-{i}")
    assert Order.objects.count() == 6


@pytest.mark.django_db(transaction=True)
@pytest.mark.freshconn_no_chaos
def test_left_alone():
    for i in range(3):
        worker.handle_naively(f"a-{i}")
    assert Order.objects.count() == 3


@pytest.mark.django_db
def test_in_one_transaction():
    worker.handle_naively("t-1")
    worker.handle_naively("t-2")
    assert Order.objects.count() == 2
"""


@pytest.fixture
def user_suite(pytester: pytest.Pytester, live: None, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A small user project (worker module + tests) pointed at this session's real server."""
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(worker=WORKER, test_user=USER_TESTS)
    return pytester


def _run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    # --reuse-db: the inner runs share one test database (created by the first), which saves seconds each.
    return suite.runpytest_subprocess(
        "-p", "no:randomly", "-p", "no:cacheprovider", "--reuse-db", "--freshconn-chaos", *args
    )


def _strikes(result: pytest.RunResult) -> list[str]:
    out = result.stdout.str()
    section = out[out.index("freshconn chaos ==") :]
    return [line.strip() for line in section.splitlines() if re.search(r"\b(kill|expire) at ", line)]


def test_code_with_units_survives_and_the_naive_worker_is_reported(user_suite: pytest.Pytester) -> None:
    """Real kills at every strike point: the freshconn worker's test passes, the naive one fails and is named."""
    result = _run(user_suite, "--freshconn-chaos-seed=7", "--freshconn-chaos-rate=1", "--freshconn-chaos-max=3")
    result.assert_outcomes(passed=3, failed=1)
    out = result.stdout.str()
    assert "freshconn chaos: seed 7, rate 1" in out  # the header says how to reproduce
    summary = out[out.index("freshconn chaos ==") :]
    lost = summary[summary.index("did not survive:") : summary.index("survived:\n")]
    survived = summary[summary.index("survived:\n") :]
    assert "test_user.py::test_naive_worker" in lost
    assert "test_worker_with_freshconn" not in lost
    assert "test_worker_with_freshconn" in survived
    assert "kill at outside units" in lost  # where it struck: between two statements of worker.py
    assert "worker.py:" in lost
    assert "not struck: test_user.py::test_in_one_transaction" in summary
    assert "test_left_alone" not in summary
    # The freshconn worker was struck too (mid-unit and at unit starts) and survived.
    assert re.search(r"\d+ strikes in 2 of 3 tests; 1 survived, 1 did not", summary)


def test_the_same_seed_strikes_the_same_points(user_suite: pytest.Pytester) -> None:
    """Two runs with one seed strike the same tests at the same points, with the same actions."""
    args = ("--freshconn-chaos-seed=11", "--freshconn-chaos-rate=0.5", "-k", "freshconn or naive")
    first, second = _run(user_suite, *args), _run(user_suite, *args)
    assert _strikes(first) == _strikes(second)
    assert first.parseoutcomes() == second.parseoutcomes()


def test_every_kind_of_strike_is_survived_by_code_with_units(user_suite: pytest.Pytester) -> None:
    """Killed and expired at unit starts, killed mid-unit: the freshconn worker's test survives them all."""
    result = _run(user_suite, "--freshconn-chaos-seed=1", "--freshconn-chaos-rate=0.6", "-k", "with_freshconn")
    result.assert_outcomes(passed=1)
    summary = result.stdout.str()[result.stdout.str().index("freshconn chaos ==") :]
    assert "1 survived, 0 did not" in summary
    survived = summary[summary.index("survived:") :]
    for strike in ("expire at unit start", "kill at mid-unit"):
        assert strike in survived
