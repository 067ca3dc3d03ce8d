"""`node.throttle`: the first event is said at once, later ones once per period with a count."""

from __future__ import annotations

import pytest

from node import throttle
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
