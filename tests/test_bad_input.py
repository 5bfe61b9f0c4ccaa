"""Every bad argument fails where it is given, naming it; nothing silently switches the protection off."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from django.db import OperationalError
from django.utils.connection import ConnectionDoesNotExist

import freshconn


@pytest.mark.parametrize(
    "make",
    [
        lambda: freshconn.unit_of_work(using="defualt"),
        lambda: freshconn.unit_of_work(using=["default", "defualt"]),
        lambda: freshconn.each([1], using="defualt"),
        lambda: freshconn.aunit_of_work(using="defualt"),
        lambda: freshconn.aeach([1], using="defualt"),
        lambda: freshconn.open_unit(using="defualt"),
        lambda: freshconn.ThreadPoolExecutor(1, using="defualt"),
        lambda: freshconn.UnitOfWork("defualt"),
    ],
    ids=["unit_of_work", "unit_of_work-list", "each", "aunit_of_work", "aeach", "open_unit", "pool", "UnitOfWork"],
)
def test_an_unknown_alias_fails_at_once_listing_the_configured_ones(make: Callable[[], object]) -> None:
    """A typo'd alias raises ConnectionDoesNotExist where it is given, naming it and the configured aliases."""
    with pytest.raises(ConnectionDoesNotExist) as err:
        make()
    message = str(err.value)
    assert "'defualt'" in message
    assert "'default'" in message
    assert "'lite'" in message


# The arguments below are wrong on purpose (Any): a type checker would refuse them too (tests/typing).
@pytest.mark.parametrize(
    ("using", "kind"),
    [(42, TypeError), (b"default", TypeError), ([42], TypeError), ([], ValueError), (object(), TypeError)],
    ids=["int", "bytes", "list-of-int", "empty", "object"],
)
def test_a_wrong_type_for_using_fails_naming_the_parameter(using: Any, kind: type[Exception]) -> None:
    """using= of the wrong type raises TypeError (or ValueError when empty) that names using= and the value."""
    with pytest.raises(kind, match=r"using="):
        freshconn.unit_of_work(using=using)


@pytest.mark.parametrize("retries", [-1, 1.5, "3", True, None])
def test_retries_must_be_a_non_negative_int(retries: Any) -> None:
    """retries= that is not an int >= 0 raises TypeError naming retries= and the value."""
    with pytest.raises(TypeError, match=r"retries="):
        freshconn.unit_of_work(retries=retries)


@pytest.mark.parametrize("idempotent", ["yes", 1, None])
def test_idempotent_must_be_a_bool(idempotent: Any) -> None:
    """idempotent= that is not True or False raises TypeError instead of being read as truthy."""
    with pytest.raises(TypeError, match=r"idempotent="):
        freshconn.unit_of_work(retries=1, idempotent=idempotent)


@pytest.mark.parametrize("items", [None, 42, "abc"])
def test_each_rejects_a_non_iterable_at_the_call(items: Any) -> None:
    """each(None) fails when called, not later when first iterated."""
    with pytest.raises(TypeError, match=r"each\(\)"):
        freshconn.each(items)


@pytest.mark.parametrize("items", [None, 42])
def test_aeach_rejects_a_non_iterable_at_the_call(items: Any) -> None:
    """aeach(None) fails when called, not inside the event loop later."""
    with pytest.raises(TypeError, match=r"aeach\(\)"):
        freshconn.aeach(items)


@pytest.mark.parametrize("value", ["x", None, 2006, (2006, "gone"), object(), OperationalError])
def test_is_disconnect_is_false_for_anything_that_is_not_an_exception(value: object) -> None:
    """is_disconnect() of a string, None, a code or an exception class is False, never an AttributeError."""
    assert freshconn.is_disconnect(value) is False


def test_unit_of_work_on_a_coroutine_function_is_refused_with_the_fix() -> None:
    """@unit_of_work on an async def raises TypeError pointing at aunit_of_work."""

    async def handler() -> None:
        await asyncio.sleep(0)

    with pytest.raises(TypeError, match="aunit_of_work"):
        freshconn.unit_of_work(handler)  # type: ignore[deprecated]  # the misuse under test


def test_a_positional_alias_is_refused_with_the_keyword_form() -> None:
    """unit_of_work("default") is a mistake for unit_of_work(using="default"): the error says so."""
    with pytest.raises(TypeError, match=r"unit_of_work\(using='default'\)"):
        freshconn.unit_of_work("default")  # type: ignore[call-overload]
