"""`node.admission`: the bound on connections not authenticated yet and an address's share of it,
in memory (the direct port's and the master's, over sockets, are in test_direct, test_master and
test_tls)."""

from __future__ import annotations

import logging

import pytest

from node.admission import Admission, source_of


@pytest.mark.parametrize(
    ("host", "source"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),  # an IPv4 peer on an IPv6 socket
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same host's (or network's) /64
        ("::1", "::/64"),
        ("not an address", "not an address"),
    ],
)
def test_an_address_is_counted_by_its_ipv4_address_or_its_ipv6_64(host: str, source: str) -> None:
    assert source_of(host) == source


def test_over_its_share_an_address_loses_its_oldest_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = Admission(limit=8, per_source=2, what="test port")
    evicted: list[int] = []
    slots = []
    with caplog.at_level(logging.WARNING, logger="cpnode.admission"):
        for number in range(5):
            slot = admission.admit("::ffff:192.0.2.1" if number % 2 else "192.0.2.1")
            assert slot is not None
            slot.evict = lambda number=number: evicted.append(number)
            slots.append(slot)
    assert evicted == [0, 1, 2]  # each newcomer over the share took the place of the oldest
    assert (admission.held, admission.held_by("192.0.2.1"), admission.evicted) == (2, 2, 3)
    assert [slot.held for slot in slots] == [False, False, False, True, True]
    slots[0].release()  # taken back already: changes nothing
    assert admission.held == 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "test port: 192.0.2.1 holds 2 connections not authenticated yet, the most one address "
        "may: its oldest closed"
    ]  # the next two are counted, and said with the next line due


def test_when_every_slot_is_held_a_newcomer_is_refused_until_one_is_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = Admission(limit=4, per_source=2, what="test port")
    slots = [admission.admit(f"192.0.2.{n // 2}") for n in range(4)]
    assert all(slot is not None for slot in slots)
    with caplog.at_level(logging.WARNING, logger="cpnode.admission"):
        assert admission.admit("198.51.100.7") is None
        assert admission.admit("198.51.100.8") is None
    assert admission.refused == 2
    assert [r.getMessage() for r in caplog.records] == [
        "test port: connection from 198.51.100.7 closed at once: 4 are not authenticated yet"
    ]
    # An address at its share still gets in, in place of its oldest: the bound holds.
    again = admission.admit("192.0.2.0")
    assert again is not None and admission.held == 4 and not slots[0].held  # type: ignore[union-attr]
    slots[2].release()  # type: ignore[union-attr]
    slots[2].release()  # type: ignore[union-attr]  # twice: counted once
    assert admission.held == 3
    assert admission.admit("198.51.100.7") is not None


def test_a_share_larger_than_the_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="per_source must be from 1 to limit"):
        Admission(limit=4, per_source=5, what="test port")
