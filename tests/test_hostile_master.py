"""A master that sends what no master should: frames that look like the node's own spill
references, a connection closed right after "OK", a large frame cut off mid-way, an oversized
frame behind valid tasks. The node skips or survives each, loses no task and touches no file
outside its own. And valid JSON in forms serde never writes, which the node reads all the same.

Real node processes against `tests.scripted.ScriptedMaster` (raw frames over loopback).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import frame
from tests.nodeproc import NodeProcess
from tests.scripted import ScriptedMaster, start_node, stop_node
from tests.test_health import free_port, scrape

SHM = "/dev/shm"


def segments_of(node_id: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"cpnode-{node_id}-seg-"))


def skipped_after(scripted: ScriptedMaster, node: NodeProcess, payloads: list[bytes]) -> list[str]:
    """Send `payloads` as frames, then a task: it must be the only one answered (the frames
    before it go unanswered); the node's "skipping" log lines by then."""
    scripted.send_raw(b"".join(frame(payload) for payload in payloads))
    scripted.send_raw(codec.encode(m.AssignTask("last", m.Compute("2*21"))))
    assert scripted.results_until("last") == [("last", m.Number(42.0))]
    return [line for line in node.log.splitlines() if "skipping" in line]


def node_of_listener(tmp_path: Path, port: int) -> NodeProcess:
    """A node (one worker, token "t") whose only master is whatever listens on `port`."""
    join = tmp_path / "join.json"
    join.write_text(f'{{"token": "t", "ip": "127.0.0.1", "port": {port}}}')
    return NodeProcess(
        tmp_path,
        join,
        {"failover_timeout_ms": 2000, "master_addresses": [f"127.0.0.1:{port}"]},
        "--workers",
        "1",
    )


def test_frames_that_look_like_spill_references_name_no_file(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    # A file named as a segment in shm_dir: a forged reference must not open or remove it.
    decoy = Path(SHM) / f"cpnode-hostile-decoy-seg-{os.getpid():08x}{'0' * 24}"
    decoy.write_bytes(b'{"AssignTask":{"id":"d","task":{"Compute":{"expression":"1"}}}}')
    assign = b'{"AssignTask":{"id":"x","task":{"Compute":{"expression":"1+1"}}}}'
    forged = [
        b"\x00" + str(victim).encode() + b'\x00\x00"Heartbeat"',
        b"\x00" + os.path.relpath(victim, SHM).encode() + b'\x00\x00"Foo"',
        b"\x00" + decoy.name.encode() + b"\x00\x00" + assign,
        b"\x00garbage without separators",
        b"\x00",
    ]
    node = start_node(tmp_path, scripted, "hostile-spill", workers=1)
    try:
        scripted.send_raw(b"".join(frame(payload) for payload in forged))
        assert scripted.run(m.Compute("2*21")) == m.Number(42.0)
        assert victim.read_text() == "keep me"
        assert decoy.exists()
        assert node.log.count("skipping a malformed frame from the master") == len(forged)
        assert "Traceback" not in node.log
        assert node.log.count("registered with master") == 1
        assert stop_node(node, scripted) == 0
    finally:
        node.close()
        decoy.unlink(missing_ok=True)


def test_a_master_that_closes_right_after_ok_does_not_crash_the_node(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    served = 0

    def serve() -> None:
        # Three connections: read the token, say OK, close at once.
        nonlocal served
        for _ in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                conn.recv(1 << 16)
                conn.sendall(frame(b"OK"))
            served += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    node = node_of_listener(tmp_path, port)
    try:
        thread.join(30)
        assert served == 3
        assert node.proc.poll() is None, node.log
        assert "Traceback" not in node.log
        assert node.stop() == 0, node.log
    finally:
        listener.close()
        node.close()


def test_a_large_frame_cut_off_mid_way_leaves_no_segment(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    node_id = "hostile-cut"
    node = start_node(tmp_path, scripted, node_id, workers=1)
    try:
        body = 4 << 20  # above the 1 MiB spill threshold: it goes to a segment as it arrives
        head = b'{"AssignTask":{"id":"big","task":{"StoreData":{"key":"k","data":['
        scripted.send_raw((body).to_bytes(4, "big") + head + b"1," * (1 << 20))
        deadline = time.monotonic() + 10
        while not segments_of(node_id) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert segments_of(node_id), "the body was not spilled to a segment"
        scripted.accept()  # closes the cut-off connection; the node comes back
        deadline = time.monotonic() + 10
        while segments_of(node_id) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert segments_of(node_id) == []
        assert scripted.run(m.Compute("1+2")) == m.Number(3.0)
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_tasks_before_an_oversized_frame_still_run(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    node = start_node(tmp_path, scripted, "hostile-oversize", max_frame_bytes=65536, workers=1)
    try:
        tasks = b"".join(
            codec.encode(m.AssignTask(f"o{i}", m.Compute(f"{i}*3"))) for i in range(20)
        )
        scripted.send_raw(tasks + (1 << 20).to_bytes(4, "big"))
        scripted.accept()  # the node closed the stream; its results come on the next one
        results = scripted.collect([f"o{i}" for i in range(20)])
        assert results == {f"o{i}": m.Number(float(i * 3)) for i in range(20)}
        assert "oversized frame" in node.log
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_a_result_above_max_frame_bytes_is_an_error_not_a_lost_task(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    node = start_node(tmp_path, scripted, "hostile-bigresult", max_frame_bytes=65536, workers=1)
    try:
        # 20,000 bytes of 255 are 80,000 bytes of JSON: no frame under the limit holds them.
        (tmp_path / "storage").mkdir(exist_ok=True)
        (tmp_path / "storage" / "big.bin").write_bytes(b"\xff" * 20_000)
        (tmp_path / "storage" / "small.bin").write_bytes(b"\xff" * 1_000)
        big, small = scripted.run_many([m.DiskRead("big.bin"), m.DiskRead("small.bin")])
        assert isinstance(big, m.Error)
        assert "above the limit of 65536 bytes (max_frame_bytes)" in big.message
        assert small == m.Bytes(b"\xff" * 1_000)
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_heartbeat_acks_in_another_json_form_confirm_results(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # `"HeartbeatAck"` with whitespace around it was ignored: no result was ever confirmed,
    # and the node would have left the master as stuck.
    scripted.ack = frame(b' "HeartbeatAck"\n')
    port = free_port()
    node = start_node(tmp_path, scripted, "other-form-acks", health_listen=f"127.0.0.1:{port}")
    try:
        assert scripted.run_many([m.Compute(f"{i}*2") for i in range(10)]) == [
            m.Number(2.0 * i) for i in range(10)
        ]
        pump = scripted.answer_in_background()  # the idle node's polls are heartbeats
        deadline = time.monotonic() + 20
        while scrape(port)[("cpnode_results_unconfirmed", ())] != 0:
            assert time.monotonic() < deadline, "results never confirmed"
            time.sleep(0.05)
        assert "skipping" not in node.log
        assert node.stop() == 0
        pump.join(10)
    finally:
        node.close()


def test_an_assign_task_without_a_readable_id_is_skipped_with_one_warning(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # The master waits for ever on it: the node can only say so, once, and go on.
    broken = b'{"AssignTask":{"task":{"Compute":{"expression":"1+1"}},"id":'
    node = start_node(tmp_path, scripted, "hostile-unreadable", workers=1)
    try:
        skipped = skipped_after(scripted, node, [broken])
        assert len(skipped) == 1, skipped
        assert "skipping an AssignTask frame whose id cannot be read (60 bytes)" in skipped[0]
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_an_assign_task_with_two_ids_gets_one_answer_under_the_id_the_node_took(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # The node took each task under its first id; the worker's JSON parser keeps the last, so
    # both were answered under "b" and "a" never was (one result lost, one doubled).
    frames = [
        b'{"AssignTask":{"id":"b","task":{"Compute":{"expression":"sqrt(4)"}}}}',
        b'{"AssignTask":{"id":"a","id":"b","task":{"Compute":{"expression":"sqrt(9)"}}}}',
        b'{"AssignTask":{"id":"c","task":{"Compute":{"expression":"sqrt(16)"}},"id":"b"}}',
        b'{"AssignTask":{"id":"d","task":{"Compute":{"expression":"1"}}},'
        b'"AssignTask":{"id":"b","task":{"Compute":{"expression":"2"}}}}',
        b'{ "AssignTask" : { "id" : "e" , "id" : "b" , "task" : { "ComplexMath" : '
        b'{ "expression" : "1+i" } } } }',
    ]
    node = start_node(tmp_path, scripted, "hostile-two-ids", workers=1)
    try:
        scripted.send_raw(b"".join(frame(payload) for payload in frames))
        scripted.send_raw(codec.encode(m.AssignTask("last", m.Compute("2*21"))))
        seen = scripted.results_until("last")  # one worker: the tasks end in order
        assert [ident for ident, _ in seen] == ["b", "a", "c", "d", "e", "last"]
        assert seen[0][1] == m.Number(2.0)
        for ident, result in seen[1:5]:
            assert isinstance(result, m.Error), (ident, result)
            assert result.message.startswith(f"malformed task: more than one id ('{ident}', 'b')")
        assert seen[5][1] == m.Number(42.0)
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_ids_that_are_not_utf8_are_skipped_not_taken_for_one_task(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # Both ids read as "u\ufffd": the second joined the first, two frames got one answer
    # under an id the master never sent.
    frames = [
        b'{ "AssignTask":{"id":"u\xff","task":{"Compute":{"expression":"1"}}}}',
        b'{ "AssignTask":{"id":"u\xfe","task":{"Compute":{"expression":"2"}}}}',
        b'{"AssignTask":{"id":"v\xff","task":{"Compute":{"expression":"3"}}}}',
    ]
    node = start_node(tmp_path, scripted, "hostile-not-utf8", workers=1)
    try:
        skipped = skipped_after(scripted, node, frames)
        assert len(skipped) == 3, skipped
        assert all("the id is not valid UTF-8" in line for line in skipped), skipped
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_an_answer_to_the_token_other_than_invalid_token_is_retried(tmp_path: Path) -> None:
    # Any answer but "OK" was taken for "Invalid token": the node gave up on the only master
    # and exited with status 3.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    node = node_of_listener(tmp_path, listener.getsockname()[1])
    try:
        first, _ = listener.accept()
        with first:
            first.settimeout(10)
            first.recv(1 << 16)
            first.sendall(frame(b"busy, retry"))
        second, _ = listener.accept()
        with second:
            second.settimeout(10)
            assert second.recv(1 << 16) == frame(b"t")
            second.sendall(frame(b"OK"))
            node.wait_for_log("registered with master")
        assert "answered b'busy, retry' to the token, not OK" in node.log
        assert "Invalid token" not in node.log
        assert node.proc.poll() is None, node.log
    finally:
        listener.close()
        node.close()


def test_a_frame_too_costly_to_parse_is_skipped_not_parsed_on_the_loop(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # Just under the 1 MiB spill threshold, 340,000 small arrays: orjson took 100-300 ms over
    # it on the event loop (heartbeats late) before finding it was no message at all.
    costly = b'{"ConnectedNodes":[' + b",".join([b"[]"] * 340_000) + b"]}"
    node = start_node(tmp_path, scripted, "hostile-costly", workers=1)
    try:
        skipped = skipped_after(scripted, node, [costly])
        assert len(skipped) == 1, skipped
        assert (
            f"skipping a {len(costly)}-byte frame from the master: too many JSON values to parse"
            " on the event loop" in skipped[0]
        )
        assert stop_node(node, scripted) == 0
    finally:
        node.close()
