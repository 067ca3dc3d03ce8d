"""`node.admission`: the bound on connections not authenticated yet and who gives way when it is
reached, in memory (the direct port's and the master's, over sockets, are in test_direct,
test_master and test_tls)."""

from __future__ import annotations

import logging

import pytest

from node.admission import Admission, Slot, source_of


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


def admit_all(admission: Admission, hosts: list[str], evicted: list[str]) -> list[Slot]:
    """A slot for each host in turn, each slot named `host#i` in `evicted` when closed."""
    slots = []
    for number, host in enumerate(hosts):
        slot = admission.admit(host)
        slot.evict = lambda name=f"{host}#{number}": evicted.append(name)
        slots.append(slot)
    return slots


def test_while_there_is_room_every_connection_gets_in_whatever_its_address() -> None:
    # A burst from one host (nodes restarting together) is never cut while there is room.
    admission = Admission(limit=8, what="test port")
    evicted: list[str] = []
    slots = admit_all(admission, ["192.0.2.1"] * 8, evicted)
    assert evicted == [] and admission.held == 8
    assert all(slot.held for slot in slots)


def test_a_full_port_closes_the_oldest_of_the_address_holding_the_most(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = Admission(limit=4, what="test port")
    evicted: list[str] = []
    slots = admit_all(admission, ["192.0.2.1", "192.0.2.9", "192.0.2.1", "192.0.2.1"], evicted)
    with caplog.at_level(logging.WARNING, logger="cpnode.admission"):
        # A newcomer from elsewhere: the address holding 3 gives way, oldest first.
        slots += admit_all(admission, ["198.51.100.7"], evicted)
        assert evicted == ["192.0.2.1#0"]
        # One from the address holding the most (2 now, as many as any): it gives way to
        # itself, never to another address's connection.
        slots += admit_all(admission, ["::ffff:192.0.2.1"], evicted)
        assert evicted == ["192.0.2.1#0", "192.0.2.1#2"]
    assert (admission.held, admission.evicted) == (4, 2)
    assert [slot.held for slot in slots] == [False, True, False, True, True, True]
    assert [r.getMessage() for r in caplog.records] == [
        "test port: 4 connections are not authenticated yet, the most it holds: the oldest of "
        "192.0.2.1's 3 closed for a connection from 198.51.100.7"
    ]  # the next one is counted, and said with the next line due
    slots[0].release()  # taken back already: changes nothing
    assert admission.held == 4
    slots[1].release()
    slots[1].release()  # twice: counted once
    assert admission.held == 3
    admit_all(admission, ["203.0.113.5"], evicted)  # room again: nothing closed
    assert len(evicted) == 2


def test_among_addresses_holding_as_many_the_oldest_connection_gives_way() -> None:
    admission = Admission(limit=3, what="test port")
    evicted: list[str] = []
    admit_all(admission, ["192.0.2.1", "192.0.2.2", "192.0.2.3"], evicted)
    admit_all(admission, ["192.0.2.4"], evicted)
    assert evicted == ["192.0.2.1#0"]
    admit_all(admission, ["192.0.2.5"], evicted)  # 2, 3 and 4 hold one each: 2's is oldest
    assert evicted == ["192.0.2.1#0", "192.0.2.2#1"]


def test_an_address_holding_as_many_as_any_gives_way_to_itself_not_to_an_older_one() -> None:
    admission = Admission(limit=4, what="test port")
    evicted: list[str] = []
    admit_all(admission, ["192.0.2.2", "192.0.2.1", "192.0.2.1", "192.0.2.2"], evicted)
    admit_all(admission, ["192.0.2.1"], evicted)  # .2's first slot is older: .1 still gives way
    assert evicted == ["192.0.2.1#1"]


def test_an_address_holding_fewer_than_the_most_takes_from_the_one_holding_the_most() -> None:
    admission = Admission(limit=4, what="test port")
    evicted: list[str] = []
    admit_all(admission, ["192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2"], evicted)
    admit_all(admission, ["192.0.2.2"], evicted)  # .2 holds 1, .1 holds 3
    assert evicted == ["192.0.2.1#0"]
    admit_all(admission, ["192.0.2.2"], evicted)  # 2 each now: .2 gives way to itself
    assert evicted == ["192.0.2.1#0", "192.0.2.2#3"]  # its oldest, the fourth of the first four


def test_a_close_that_fails_still_keeps_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    admission = Admission(limit=1, what="test port")
    slot = admission.admit("192.0.2.1")

    def broken() -> None:
        raise RuntimeError("a bug in a protocol")

    slot.evict = broken
    with caplog.at_level(logging.ERROR, logger="cpnode.admission"):
        assert admission.admit("192.0.2.2").held
    assert admission.held == 1 and not slot.held
    assert "closing a connection from 192.0.2.1 failed" in caplog.text


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit must be at least 1"):
        Admission(limit=0, what="test port")
