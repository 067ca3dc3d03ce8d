"""`node.throttle`: the first event is said at once, later ones once per period with a count."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest

from node import health, throttle
from node.config import Config, JoinInfo
from node.link import MasterLink
from node.protocol import messages as m
from node.throttle import Throttle, more_since


def test_a_throttle_says_the_first_event_then_one_line_per_period_with_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    quiet = Throttle(10.0)
    assert [quiet.hit(), quiet.hit(), quiet.hit()] == [1, 0, 0]
    now[0] += 10.0
    assert quiet.hit() == 3  # this one and the two kept quiet
    assert quiet.hit() == 0
    assert more_since(3) == " (2 more since the last such line)"
    assert more_since(1) == ""


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    return now


def test_late_heartbeats_are_warned_of_once_per_period_with_the_count(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    link = MasterLink(
        Config(),
        JoinInfo("token", "127.0.0.1", 9),
        m.Role.Worker,
        on_assign=lambda ids, payloads: None,
        has_capacity=lambda: True,
    )
    link._observe_lateness(0.05, 0.2)  # within half an interval: not worth a line
    for _ in range(3):
        link._observe_lateness(0.3, 0.2)
    clock[0] += 10.0
    link._observe_lateness(0.3, 0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "cpnode.link"]
    assert len(lines) == 2, lines
    assert "left 300 ms late (every 200 ms planned; 1 late since the last warning)" in lines[0]
    assert "; 3 late since the last warning)" in lines[1]  # this one and the two kept quiet
    assert link.heartbeat_lateness.count == 5


def test_refused_health_connections_are_logged_once_per_period_with_the_count(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    server = health.HealthServer(cast(Any, None), "127.0.0.1", 0)
    writer = cast(Any, SimpleNamespace(transport=SimpleNamespace(abort=lambda: None)))
    caplog.set_level(logging.WARNING, "cpnode.health")
    for _ in range(4):
        server._refuse(writer)
    clock[0] += health.REFUSED_LOG_EVERY_S
    server._refuse(writer)
    lines = [r.getMessage() for r in caplog.records if r.name == "cpnode.health"]
    assert len(lines) == 2, lines
    assert "(1 so far," in lines[0] and "more since" not in lines[0]
    assert "(5 so far," in lines[1] and lines[1].endswith(" (3 more since the last such line)")
    assert server.connections_refused == 5
