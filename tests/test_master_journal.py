"""The master's journal: records written by the writer thread, replay, compaction, bad files."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import orjson
import pytest

from node.master.journal import ALL_WRITTEN, HEADER, Journal, JournalError, replay
from node.protocol import messages as m
from node.protocol import result_to_json, task_to_json

NOW = 1_700_000_000.0


def _id(ident: str) -> bytes:
    return orjson.dumps(ident)


def _submit(journal: Journal, ident: str, task: m.Task) -> None:
    journal.submit(_id(ident), task_to_json(task))


def _result(journal: Journal, ident: str, result: m.Result, at: float = NOW) -> None:
    journal.result(_id(ident), result_to_json(result), at)


def _journal(path: Path, **options: object) -> Journal:
    journal = Journal(path, **options)  # type: ignore[arg-type]
    journal.start([], [])
    return journal


def test_a_missing_file_replays_as_empty(tmp_path):
    replayed = replay(tmp_path / "absent", ttl_s=60)
    assert (replayed.tasks, replayed.results, replayed.source) == ([], [], "none")


def test_records_replay_with_the_masters_rules(tmp_path):
    path = tmp_path / "state"
    journal = _journal(path)
    _submit(journal, "a", m.Compute("1"))
    _submit(journal, "b", m.DiskRead("x"))
    _submit(journal, "c", m.Tcp("h:1", b"\x00\xff"))
    _result(journal, "b", m.Bytes(b"hi"))
    _result(journal, "orphan", m.Error("no such task"))  # any id is accepted
    _result(journal, "b", m.Written())  # a repeat overwrites
    _submit(journal, "a", m.Compute("2"))  # a waiting id is replaced, moves to the back
    journal.close()
    replayed = replay(path, ttl_s=3600, now=NOW + 1)
    assert replayed.tasks == [("c", m.Tcp("h:1", b"\x00\xff")), ("a", m.Compute("2"))]
    assert replayed.results == [
        ("orphan", result_to_json(m.Error("no such task")), NOW),
        ("b", b'"Written"', NOW),
    ]
    assert path.read_bytes().startswith(HEADER)


def test_a_resubmitted_completed_task_runs_again(tmp_path):
    path = tmp_path / "state"
    journal = _journal(path)
    _submit(journal, "a", m.Compute("1"))
    _result(journal, "a", m.Number(1.0))
    _submit(journal, "a", m.Compute("1"))
    journal.close()
    replayed = replay(path, ttl_s=3600, now=NOW)
    assert (replayed.tasks, replayed.results) == ([("a", m.Compute("1"))], [])


def test_results_older_than_the_ttl_are_dropped(tmp_path):
    path = tmp_path / "state"
    journal = _journal(path)
    _result(journal, "old", m.Number(1.0), at=NOW - 100)
    _result(journal, "new", m.Number(2.0), at=NOW - 10)
    journal.close()
    replayed = replay(path, ttl_s=60, now=NOW)
    assert [ident for ident, _, _ in replayed.results] == ["new"]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "state"
    journal = _journal(path)
    _submit(journal, "a", m.Compute("1"))
    journal.close()
    with path.open("ab") as file:
        file.write(b'{"op":"result","id":"a","res')
    with caplog.at_level(logging.WARNING):
        replayed = replay(path, ttl_s=60, now=NOW)
    assert replayed.tasks == [("a", m.Compute("1"))]
    assert replayed.skipped == 1
    assert "line 3 is incomplete" in caplog.text


def test_an_unreadable_line_in_the_middle_is_skipped_with_its_number(tmp_path, caplog):
    path = tmp_path / "state"
    lines = [
        HEADER,
        b'{"op":"submit","id":"a","task":{"Compute":{"expression":"1"}}}\n',
        b'{"op":"submit","id":"b","task":{"Nope":{}}}\n',
        b'{"op":"submit","id":"c","task":"GetStorage"}\n',
    ]
    path.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING):
        replayed = replay(path, ttl_s=60, now=NOW)
    assert replayed.tasks == [("a", m.Compute("1")), ("c", m.GetStorage())]
    assert "line 3 unreadable" in caplog.text


def test_a_file_without_any_record_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "state"
    path.write_text("these are\nmy notes\n")
    with pytest.raises(JournalError, match="not a cpnode-master journal"):
        replay(path, ttl_s=60)
    assert path.read_text() == "these are\nmy notes\n"


def test_a_newer_journal_version_is_not_silently_misread(tmp_path):
    path = tmp_path / "state"
    path.write_bytes(b'{"op":"journal","format":"cpnode-master","version":99}\n')
    with pytest.raises(JournalError):
        replay(path, ttl_s=60)


def test_compaction_rewrites_the_file_and_later_records_follow(tmp_path):
    path = tmp_path / "state"
    journal = _journal(path)
    for i in range(500):
        _submit(journal, f"t{i}", m.Compute(str(i)))
        _result(journal, f"t{i}", m.Number(float(i)))
    assert journal.wants_compaction(live_records=500) is False  # default slack: 10,000
    journal.compact([(_id("left"), task_to_json(m.Compute("9")))], [])
    _submit(journal, "after", m.GetGlobalRam())
    journal.close()
    data = path.read_bytes()
    assert data.count(b"\n") == 3  # header, the snapshot's task, the record after it
    replayed = replay(path, ttl_s=60, now=NOW)
    assert replayed.tasks == [("left", m.Compute("9")), ("after", m.GetGlobalRam())]
    assert not list(tmp_path.glob("*.tmp"))


def test_compaction_is_wanted_past_the_ratio_plus_slack(tmp_path):
    journal = _journal(tmp_path / "state", compact_ratio=2, compact_slack=10)
    for i in range(31):
        _submit(journal, f"t{i}", m.Compute("1"))
    assert journal.wants_compaction(live_records=10)  # 31 > 2 * 10 + 10
    assert not journal.wants_compaction(live_records=11)
    journal.close()


def test_the_writer_fsyncs_within_the_interval_without_new_records(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    journal = _journal(tmp_path / "state", fsync_interval_s=0.05)
    time.sleep(0.1)  # the start-up rewrite is fsync'ed
    before = len(synced)
    _submit(journal, "a", m.Compute("1"))
    journal.flush()
    deadline = time.monotonic() + 5
    while len(synced) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(synced) > before
    journal.close()


def test_an_upstream_state_file_is_imported_and_kept_aside(tmp_path):
    path = tmp_path / "master_state.json"
    upstream = {
        "connected_nodes": {
            "127.0.0.1:4000": {
                "addr": "127.0.0.1:4000",
                "last_heartbeat": 1,
                "port": None,
                "active_tasks": {"running": {"Compute": {"expression": "2*3"}}},
                "is_worker": True,
            }
        },
        "available_ports": [55001],
        "pending_tasks": {"waiting": {"DiskRead": {"path": "a"}}, "bad": {"Nope": 1}},
        "completed_tasks": {"done": {"Number": 3.0}},
    }
    path.write_text(json.dumps(upstream, indent=2))
    replayed = replay(path, ttl_s=60, now=NOW)
    assert replayed.source == "upstream"
    assert sorted(replayed.tasks, key=lambda item: item[0]) == [
        ("running", m.Compute("2*3")),  # upstream would have lost it
        ("waiting", m.DiskRead("a")),
    ]
    assert replayed.results == [("done", b'{"Number":3.0}', NOW)]
    assert replayed.skipped == 1


def test_the_writer_reports_each_ticket_once_its_records_are_in_the_file(tmp_path):
    # The master holds TaskAccepted back until the ticket of its record is reported: by then
    # the record must be in the file (a crash of the process cannot lose it).
    path = tmp_path / "state"
    seen: list[tuple[int, bytes]] = []  # (ticket, what the file held when it was reported)
    journal = Journal(path)
    journal.start([], [], on_written=lambda ticket: seen.append((ticket, path.read_bytes())))
    tickets = {}
    for i in range(50):
        _submit(journal, f"t{i}", m.Compute(str(i)))
        tickets[f"t{i}"] = journal.ticket
        journal.flush()
    deadline = time.monotonic() + 10  # the 50 written before the compaction rewrites the file
    while not seen or seen[-1][0] < tickets["t49"]:
        assert time.monotonic() < deadline, seen[-1:]
        time.sleep(0.01)
    journal.compact([(_id("kept"), task_to_json(m.Compute("1")))], [])
    _submit(journal, "after", m.Compute("2"))
    tickets["after"] = journal.ticket
    journal.close()
    reported = [ticket for ticket, _ in seen]
    assert reported == sorted(reported) and reported[-1] == ALL_WRITTEN
    for ident, ticket in tickets.items():
        data = next(data for reported, data in seen if reported >= ticket)
        assert b'"id":"' + ident.encode() + b'"' in data, ident
    assert b'"after"' in next(data for reported, data in seen if reported >= tickets["after"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_once_the_writer_is_gone_batches_are_dropped_and_counted_not_queued(
    tmp_path, monkeypatch, caplog
):
    # The loop went on queueing every batch for a writer thread that had died: the master's
    # memory grew for as long as it ran.
    def broken_write(self: Journal, file: object, batch: list[bytes]) -> object:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(Journal, "_write", broken_write)
    path = tmp_path / "state"
    reported: list[int] = []
    journal = Journal(path)
    journal.start([], [], on_written=reported.append)
    _submit(journal, "first", m.Compute("1"))
    journal.flush()  # the writer dies on it
    deadline = time.monotonic() + 10
    while ALL_WRITTEN not in reported:
        assert time.monotonic() < deadline, reported
        time.sleep(0.01)
    assert journal.failed
    for i in range(1000):
        _submit(journal, f"t{i}", m.Compute(str(i)))
        _result(journal, f"t{i}", m.Number(float(i)))
        journal.flush()
    assert journal._queue.qsize() == 0
    assert journal.dropped == 2000
    journal.compact([(_id("kept"), task_to_json(m.Compute("1")))], [])  # the server's retry
    assert journal._queue.qsize() == 0 and journal.failed
    journal.close()
    assert reported[-1] == ALL_WRITTEN
    assert path.read_bytes() == HEADER  # the start-up rewrite, nothing after
    lines = [r for r in caplog.records if r.name == "cpnode.master.journal"]
    assert [(r.levelno, r.exc_info is not None) for r in lines] == [
        (logging.ERROR, True),  # the writer's death, with its traceback
        (logging.ERROR, False),  # at close: how many records were not persisted
    ]
    assert "2000 records were not persisted" in lines[1].getMessage()
