"""Storage tasks through a real node: the upstream vectors, worker-to-worker sharing, cleanup."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import orjson
import psutil
import pytest

from node.config import Config
from node.master import MasterThread
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.errors import RemoteProtocolError
from node.protocol.framing import frame
from shm.bytesjson import ByteArrayError
from shm.diskstore import DIRECTORY_BYTES, MAX_PATH_PARTS, MIB, DiskStore
from shm.nodedir import LEDGER_DIR, claim_node_dir, node_dir_path
from shm.segments import IncomingSegment
from tests.nodeproc import NodeProcess
from tests.scripted import ScriptedMaster, stop_node
from tests.scripted import start_node as scripted_start_node
from tests.test_health import free_port, scrape
from tests.test_node import run_tasks
from tests.test_result_segments import PoolRun
from tests.test_shm_segments import mounted_tmpfs
from tests.test_shm_stores import charge
from workers import tasks as worker_tasks
from workers.channel import SEGMENT_RESERVE_BYTES
from workers.storage import BLOB_FAST_PATH_BYTES, decode_blob_task, memory_reserve_bytes
from workers.tasks import TaskRunner, WorkerSettings

DATA = Path(__file__).parent / "data"
SHM = "/dev/shm"


def ours_in_shm(node_id: str) -> list[str]:
    return sorted(name for name in os.listdir(SHM) if name.startswith(f"cpnode-{node_id}"))


def start_node(
    tmp_path: Path, master: ScriptedMaster, role: str, node_id: str, **config: object
) -> NodeProcess:
    return scripted_start_node(tmp_path, master, node_id, role=role, shm_dir=SHM, **config)


def vectors(prefix: str) -> list[dict[str, object]]:
    lines = (DATA / "storage_vectors.jsonl").read_text().splitlines()
    return [v for v in map(json.loads, lines) if str(v["role"]).startswith(prefix)]


@pytest.mark.parametrize(("role", "prefix"), [("Disk", "disk"), ("Worker", "worker")])
def test_upstream_storage_vectors(
    tmp_path: Path, scripted: ScriptedMaster, role: str, prefix: str
) -> None:
    node_id = f"test-vectors-{prefix}-{os.getpid()}"
    node = start_node(tmp_path, scripted, role, node_id, disk_space_mb=1)
    try:
        for vector in vectors(prefix):
            task = codec.task_from_json(vector["task"])
            result = scripted.run(task)
            expected = codec.result_from_json(vector["result"])
            if isinstance(expected, m.Response) and expected.text.startswith("free: 1048573"):
                # Upstream counts only StoreData against the quota; ours counts every write
                # (k1: 3 bytes, a/b.txt: 2, top.bin: 1) and each directory it makes at 4 KiB
                # (a/ for a/b.txt): disk_space_mb bounds all that a disk write takes.
                expected = m.Response(expected.text.replace("1048573", "1044474"))
            if isinstance(expected, m.Response) and role == "Worker" and "b: 1" in expected.text:
                expected = m.Response("a: 1 bytes\nb: 1 bytes\n")  # ours: sorted by key
            assert result == expected, vector
        assert stop_node(node, scripted) == 0
    finally:
        node.close()
    assert ours_in_shm(node_id) == []


def test_key_stored_by_one_worker_is_read_by_another(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    node_id = f"test-share-{os.getpid()}"
    node = start_node(tmp_path, scripted, "Worker", node_id, prefetch=1)
    try:
        keys = [f"key-{i}" for i in range(40)]
        stored = scripted.run_many([m.StoreData(k, k.encode() * 3) for k in keys])
        assert stored == [m.Stored()] * len(keys)
        # With one task in flight per worker, 40 reads spread over both workers.
        read = scripted.run_many([m.RetrieveData(k) for k in reversed(keys)])
        assert read == [m.Bytes(k.encode() * 3) for k in reversed(keys)]
        report = scripted.run(m.GetGlobalRam())
        assert isinstance(report, m.Response)
        assert report.text.splitlines() == [f"{k}: {len(k) * 3} bytes" for k in sorted(keys)]
        assert scripted.run(m.RetrieveData("missing")) == m.Error("Key not found")
    finally:
        stop_node(node, scripted)
        node.close()


def test_large_blobs_cross_through_segments_both_ways(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    """1 MiB blobs are ~3.6 MiB frames: tasks reach a worker and results come back through
    payload segments (counted in /metrics), and no segment file outlives its hand-over."""
    node_id = f"test-blob-{os.getpid()}"
    port = free_port()
    node = start_node(tmp_path, scripted, "Worker", node_id, health_listen=f"127.0.0.1:{port}")
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    try:
        assert scripted.run(m.StoreData("blob", blob)) == m.Stored()
        assert scripted.run(m.RetrieveData("blob")) == m.Bytes(blob)
        # Not confirmed yet (no heartbeat after it was answered): held as a mapping.
        mapped = scrape(port)[("cpnode_results_mapped_bytes", ())]
        assert mapped > 3 * len(blob)
        assert scripted.run(m.DiskWrite("sub/dir/blob.bin", blob)) == m.Written()
        assert (tmp_path / "storage" / "sub" / "dir" / "blob.bin").read_bytes() == blob
        assert scripted.run(m.DiskRead("sub/dir/blob.bin")) == m.Bytes(blob)
        assert scripted.run(m.RetrieveData("blob")) == m.Bytes(blob)  # from another segment
        assert scripted.run(m.RetrieveData("small")) == m.Error("Key not found")
        samples = scrape(port)
        frames = "cpnode_segment_frames_total"
        assert samples[(frames, (("direction", "to_worker"),))] == 2
        assert samples[(frames, (("direction", "from_worker"),))] == 3
        assert [name for name in ours_in_shm(node_id) if "-seg-" in name] == []
        # Idle polls are heartbeats; once one is answered the mappings go.
        deadline = time.monotonic() + 20
        while scrape(port)[("cpnode_results_mapped_bytes", ())] != 0:
            assert time.monotonic() < deadline, "mapped results never confirmed"
            assert scripted.run(m.Compute("1+1")) == m.Number(2.0)
            time.sleep(0.1)
    finally:
        stop_node(node, scripted)
        node.close()
    assert ours_in_shm(node_id) == []


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../x", "a\x00b", "..", "sub/../../etc"]
)
def test_hostile_paths_are_invalid(tmp_path: Path, scripted: ScriptedMaster, path: str) -> None:
    node_id = f"test-paths-{os.getpid()}"
    node = start_node(tmp_path, scripted, "Disk", node_id)
    try:
        assert scripted.run(m.DiskWrite(path, b"x")) == m.Error("Invalid path")
        assert scripted.run(m.StoreData(path, b"x")) == m.Error("Invalid path")
        assert not (tmp_path / "x").exists()
        # The wire says what upstream says; the log says why, for the operator.
        node.wait_for_log(f"DiskWrite refused {path!r}: ")
        node.wait_for_log(f"StoreData refused {path!r}: ")
    finally:
        stop_node(node, scripted)
        node.close()


def test_a_write_over_the_quota_says_by_how_much_in_the_log(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    node = start_node(tmp_path, scripted, "Disk", f"test-quota-log-{os.getpid()}", disk_space_mb=1)
    try:
        assert scripted.run(m.DiskWrite("big", bytes(MIB + 10))) == m.Error("quota exceeded")
        node.wait_for_log(
            "DiskWrite refused: writing 'big' would change the store's use by 1048586 bytes, "
            "from 0 to 1048586, above the quota of 1048576 bytes (by 10 bytes)"
        )
    finally:
        stop_node(node, scripted)
        node.close()


def test_deep_disk_writes_on_a_1_mib_disk_node_stay_within_the_quota(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    """The reviewer's case: 25 DiskWrites of an empty file 2,000 directories deep all said
    `Written`, storage_dir grew to 195 MiB against a 1 MiB quota, and GetStorage still said
    all of it was free. Now such a path is too deep; and paths as deep as allowed (63 new
    directories each, sent at once to both workers) are refused once their directories fill
    the quota, while GetStorage's figure is what the ledger and the tree say."""
    node_id = f"test-deep-{os.getpid()}"
    storage = tmp_path / "storage"
    node = start_node(tmp_path, scripted, "Disk", node_id, disk_space_mb=1)
    try:
        reviewers = [m.DiskWrite(f"t{i}/" + "/".join(["d"] * 2000) + "/f", b"") for i in range(25)]
        assert scripted.run_many(reviewers) == [m.Error("Invalid path")] * 25
        node.wait_for_log("2002 parts deep, more than the 64 a path may have")
        assert not storage.exists() or list(storage.iterdir()) == []
        deep = "/".join(["d"] * (MAX_PATH_PARTS - 2))
        results = scripted.run_many([m.DiskWrite(f"u{i}/{deep}/f", b"") for i in range(25)])
        written = results.count(m.Written())
        assert results.count(m.Error("quota exceeded")) == 25 - written
        # At most 4 x 63 of the 256 directories 1 MiB holds (two writers racing for the last
        # room may both be refused); a refused write leaves none of its directories.
        assert 1 <= written <= MIB // (63 * DIRECTORY_BYTES) == 4
        counted = charge(storage)
        assert counted == written * 63 * DIRECTORY_BYTES
        on_disk = sum(path.lstat().st_blocks * 512 for path in storage.rglob("*"))
        assert on_disk <= MIB  # what the filesystem really gave it (ext4: 4 KiB a directory)
        report = scripted.run(m.GetStorage())
        assert report == m.Response(f"free: {MIB - counted} bytes\nNo entries found\n")
        ledger = os.path.join(node_dir_path(SHM, node_id), LEDGER_DIR)
        with DiskStore(storage, MIB, ledger) as shared:  # the node's own ledger
            assert shared.used_bytes() == counted
        node.wait_for_log("DiskWrite refused: making the directory 'u")
        assert stop_node(node, scripted) == 0
    finally:
        node.close()
    assert ours_in_shm(node_id) == []


def test_sigkill_then_restart_leaves_nothing_in_shm(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    node_id = f"test-crash-{os.getpid()}"
    node = start_node(tmp_path, scripted, "Worker", node_id)
    try:
        assert scripted.run(m.StoreData("k", b"volatile")) == m.Stored()
        assert ours_in_shm(node_id) != []
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        assert node.leftover_children(timeout=10) == []
        assert ours_in_shm(node_id) != []  # a crash leaves the store behind...
    finally:
        node.close()
    restarted = start_node(tmp_path, scripted, "Worker", node_id)
    try:
        # ...and the next run with the same node_id clears it: the store starts empty.
        assert scripted.run(m.RetrieveData("k")) == m.Error("Key not found")
        assert stop_node(restarted, scripted) == 0
    finally:
        restarted.close()
    assert ours_in_shm(node_id) == []


def test_two_nodes_on_one_host_never_share_a_directory(tmp_path: Path) -> None:
    join = tmp_path / "join.json"
    with MasterThread(Config(), join_path=str(join)) as master:
        base = f"worker-{master.port}"  # what both derive without a node_id
        nodes: list[NodeProcess] = []
        try:
            for name in ("a", "b"):
                home = tmp_path / name
                home.mkdir()
                settings = {"master_addresses": [master.address], "node_id": None}
                nodes.append(NodeProcess(home, join, settings, "--workers", "1"))
                nodes[-1].wait_for_log("node ready")
            assert f"node_id {base} is in use on this host; using {base}-2" in nodes[1].log
            assert ours_in_shm(base) == [f"cpnode-{base}", f"cpnode-{base}-2"]
            results = run_tasks(join, [m.Compute(f"{i}+1") for i in range(200)])
            assert results == [m.Number(float(i + 1)) for i in range(200)]
            for node in nodes:
                assert node.stop() == 0
        finally:
            for node in nodes:
                node.close()
    assert ours_in_shm(base) == []


def test_a_spilled_payload_runs_in_place_and_its_segment_goes(tmp_path: Path) -> None:
    node_id = f"test-spill-{os.getpid()}"
    blob = bytes(range(256)) * 1024
    payload = codec.encode_payload(m.AssignTask("big", m.DiskWrite("spilled.bin", blob)))
    with claim_node_dir(SHM, node_id) as node_dir:
        segment = IncomingSegment(SHM, node_dir.segment_prefix, len(payload))
        for start in range(0, len(payload), 65536):
            segment.write(payload[start : start + 65536])
        reference = segment.finish()
        assert len(reference) < 5000 and segment.name in os.listdir(SHM)
        settings = WorkerSettings(node_id=node_id, storage_dir=str(tmp_path / "storage"))
        # A worker gets the reference as plain bytes, off its socket pair.
        result = TaskRunner(settings).run_payload(bytes(reference))
        assert result == b'{"TaskResult":{"id":"big","result":"Written"}}'
        assert (tmp_path / "storage" / "spilled.bin").read_bytes() == blob
        assert segment.name not in os.listdir(SHM)  # the worker took it over and removed it


def blob_task_payload(ident: bytes, variant: str, name: bytes, size: int) -> bytes:
    """An `AssignTask` of `variant` as a master writes it, with `ident` and `name` put in as
    raw JSON string bodies (so they can hold what no encoder writes) and `size` bytes of data."""
    field = b"key" if variant == "StoreData" else b"path"
    data = b"[" + b",".join([b"7"] * size) + b"]"
    head = b'{"AssignTask":{"id":"%s","task":{"%s":{"%s":"%s","data":' % (
        ident,
        variant.encode(),
        field,
        name,
    )
    return head + data + b"}}}}"


BAD_STRINGS = [
    pytest.param(rb"a\qb", id="unknown-escape"),
    pytest.param(rb"\ud800", id="lone-surrogate"),
    pytest.param(rb"\udc00x", id="lone-low-surrogate"),
    pytest.param(b"a\x01b", id="control-character"),
    pytest.param(rb"\u12", id="short-unicode-escape"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
]
SIZES = [10, BLOB_FAST_PATH_BYTES // 2 + 1, 600_000]  # small; the fast path; spilled (> 1 MiB)


def test_large_tasks_with_a_bad_string_get_an_error_and_the_workers_live(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    """A bad string in the key or path of a large StoreData/DiskWrite once killed the worker
    (the fast path's decoder raised); now it is answered as the same task, small, is."""
    node_id = f"test-badblob-{os.getpid()}"
    node = start_node(tmp_path, scripted, "Worker", node_id)
    try:
        for number, case in enumerate(BAD_STRINGS):
            (bad,) = case.values
            for variant in ("StoreData", "DiskWrite"):
                answers = []
                for step, size in enumerate(SIZES):
                    ident = f"bad-{number}-{variant}-{step}"  # as long for each size
                    payload = blob_task_payload(ident.encode(), variant, bad, size)
                    assert (size > 10) == (len(payload) >= BLOB_FAST_PATH_BYTES)
                    scripted.send_raw(frame(payload))
                    answers.append(scripted.collect([ident])[ident])
                assert isinstance(answers[0], m.Error), (case.id, answers[0])
                assert answers[0].message.startswith("malformed task: malformed JSON: ")
                assert answers == [answers[0]] * len(SIZES), case.id
        assert scripted.run(m.StoreData("after", b"ok")) == m.Stored()
        assert scripted.run(m.RetrieveData("after")) == m.Bytes(b"ok")
        assert all(child.is_running() for child in node.children)  # no worker was replaced
        assert "died" not in node.log
        assert not (tmp_path / "storage").exists() or list((tmp_path / "storage").iterdir()) == []
        assert stop_node(node, scripted) == 0
    finally:
        node.close()
    assert ours_in_shm(node_id) == []


def other_form(ident: str, task: m.Task) -> bytes:
    """An `AssignTask` payload in valid JSON that no master writes: spaces, "task" first."""
    return (
        b' { "AssignTask" : { "task" : '
        + codec.task_to_json(task)
        + b' , "id" : '
        + (codec.json_str(ident) + b" } } ")
    )


@pytest.mark.parametrize(
    "task",
    [
        m.StoreData('k "[1]"', bytes(range(256)) * 400),
        m.DiskWrite("a/b.bin", os.urandom(100_000)),
        m.Tcp("127.0.0.1:9", bytes(70_000)),
        m.Udp("127.0.0.1:9", b"\xff" * 70_000),
    ],
    ids=lambda task: type(task).__name__,
)
def test_a_blob_task_in_another_json_form_decodes_as_the_generic_decoder_does(
    task: m.Task,
) -> None:
    payload = other_form('id \\ "x"', task)
    assert decode_blob_task(payload) == ('id \\ "x"', task)
    assert decode_blob_task(memoryview(payload)) == ('id \\ "x"', task)  # a mapped segment
    assert codec.decode(payload) == m.AssignTask('id \\ "x"', task)


def test_a_malformed_blob_task_in_another_form_gets_the_generic_decoders_words() -> None:
    array = orjson.dumps(list(bytes(100_000)))
    no_addr = b'{"AssignTask":{"task":{"Tcp":{"data":' + array + b'}},"id":"x"}}'
    with pytest.raises(RemoteProtocolError) as ours:
        decode_blob_task(no_addr)
    with pytest.raises(RemoteProtocolError) as generic:
        codec.decode(no_addr)
    assert str(ours.value) == str(generic.value) == "AssignTask.task.Tcp: missing field `addr`"
    bad_byte = no_addr.replace(b"[0,0,0,", b"[0,0,300,", 1).replace(b"}}", b',"addr":"h:1"}}', 1)
    with pytest.raises(ByteArrayError, match="300 is above 255"):
        decode_blob_task(bad_byte)


@pytest.mark.parametrize("size", [100_000, 512 * 1024], ids=["in-a-frame", "spilled"])
def test_tasks_in_another_json_form_are_answered(
    tmp_path: Path, scripted: ScriptedMaster, size: int
) -> None:
    """Such an AssignTask was skipped without a word (its id is not at its head), so the
    master waited for ever; a big one's id is read around its byte array, in a frame (a
    look in the payload) or in a segment (a look in the mapping)."""
    node_id = f"test-other-form-{size}-{os.getpid()}"
    node = start_node(tmp_path, scripted, "Worker", node_id)
    blob = os.urandom(size)
    try:
        scripted.send_raw(
            frame(other_form("c1", m.Compute("1+2")))
            + frame(other_form("s1", m.StoreData("k", blob)))
        )
        assert scripted.collect(["c1", "s1"], timeout=30) == {
            "c1": m.Number(3.0),
            "s1": m.Stored(),
        }
        assert scripted.run(m.RetrieveData("k")) == m.Bytes(blob)
        assert "skipping" not in node.log
        assert stop_node(node, scripted) == 0
    finally:
        node.close()
    assert ours_in_shm(node_id) == []


def test_odd_but_valid_assign_tasks_are_answered_under_their_ids(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    """Each was dropped without an answer: an escaped variant name, a long run of spaces
    before it (in a frame, and in a spilled one), a 70 KB task with its id last (no byte array
    to find it by); and a spilled task with its id after a malformed array was answered under
    the id ""."""
    node_id = f"test-odd-forms-{os.getpid()}"
    node = start_node(tmp_path, scripted, "Worker", node_id)
    array = orjson.dumps(list(os.urandom(400_000)))  # a 1.4 MB frame: spilled
    odd = {
        "escaped": b'{"\\u0041ssignTask":{"id":"escaped","task":{"Compute":{"expression":"1+1"}}}}',
        "spaces": b" " * 100 + b'{"AssignTask":{"id":"spaces","task":"GetGlobalRam"}}',
        "long": b'{"AssignTask":{"task":{"Compute":{"expression":"'
        + b"1+" * 35_000
        + b'1"}},"id":"long"}}',
        "bad-array": b'{"AssignTask":{"task":{"StoreData":{"data":[256,'
        + array[1:]
        + b',"key":"k"}},"id":"bad-array"}}',
        "spaces-big": b" " * 100
        + b'{"AssignTask":{"id":"spaces-big","task":{"StoreData":{"key":"k","data":'
        + array
        + b"}}}}",
    }
    try:
        scripted.send_raw(b"".join(frame(payload) for payload in odd.values()))
        results = scripted.collect(list(odd), timeout=30)
        assert results["escaped"] == m.Number(2.0)
        assert results["spaces"] == m.Response("No entries found\n")
        assert isinstance(results["long"], m.Error), results["long"]
        assert results["long"].message.startswith("Parse error: Expression too long: 70001 bytes")
        assert results["bad-array"] == m.Error(
            "malformed task: invalid JSON byte array: 256 is above 255 (at element 0, offset 1)"
        )
        assert results["spaces-big"] == m.Stored()
        assert "skipping" not in node.log
        assert stop_node(node, scripted) == 0
    finally:
        node.close()
    assert ours_in_shm(node_id) == []


def test_a_large_task_with_an_unreadable_id_is_answered_without_an_id(tmp_path: Path) -> None:
    """The supervisor skips such a frame (it cannot say whose it is); a worker given one still
    answers it rather than dying."""
    runner = TaskRunner(WorkerSettings(storage_dir=str(tmp_path / "storage")))
    # The id is what the supervisor's peek reads: nothing, or the raw text as it stands.
    for bad, ident in ((rb"a\qb", ""), (rb"\ud800", ""), (b"a\x01b", "a\x01b")):
        answers = [
            runner.run_payload(blob_task_payload(bad, "DiskWrite", b"f", size)) for size in SIZES
        ]
        assert answers == [answers[0]] * len(SIZES)
        result = codec.decode(answers[0])
        assert isinstance(result, m.TaskResult) and result.id == ident
        assert isinstance(result.result, m.Error)
        assert result.result.message.startswith("malformed task: malformed JSON: ")
    assert not (tmp_path / "storage").exists()


def test_a_bug_while_running_one_task_is_its_error_not_the_workers_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection (the one stand-in here): the blob decoder raises what no path expects,
    as it did for a bad escape. The task gets an `Error` with its id, the traceback is logged,
    and the runner goes on with the next task."""

    def broken(payload: bytes | memoryview) -> None:
        raise KeyError("a bug")

    runner = TaskRunner(WorkerSettings(storage_dir=str(tmp_path / "storage")))
    monkeypatch.setattr(worker_tasks, "decode_blob_task", broken)
    payload = blob_task_payload(b"t-1", "StoreData", b"k", 40_000)
    with caplog.at_level(logging.ERROR, logger="cpnode.worker"):
        answer = runner.run_payload(payload)
    assert codec.decode(answer) == m.TaskResult(
        "t-1", m.Error("the worker failed to run this task: KeyError('a bug')")
    )
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and "'t-1'" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert runner.stats.rows["failed"][1] == 1  # counted as a failed task
    plain = b'{"AssignTask":{"id":"t-2","task":{"Compute":{"expression":"1+2"}}}}'
    assert runner.run_payload(plain) == b'{"TaskResult":{"id":"t-2","result":{"Number":3.0}}}'


def test_a_dead_workers_temporary_files_go_when_the_pool_sees_it_die(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real worker (Disk role, 1 MiB quota) is SIGKILLed; files named as its temporary files
    stand for the store entry and disk file it was writing. The pool's death handling removes
    them (and nobody else's) and recounts the quota ledger, which the writer may have left
    counting a file that never arrived (here: one removed behind the ledger's back)."""
    node_id = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "storage"
    settings = WorkerSettings(
        role=m.Role.Disk, node_id=node_id, storage_dir=str(storage), shm_dir=SHM, disk_space_mb=1
    )

    async def scenario(mem: Path, ledger_dir: str) -> tuple[list[str], list[str]]:
        run = PoolRun(settings)
        await run.pool.start()
        try:
            await run.run([("w", m.DiskWrite("gone.bin", bytes(5000)))])
            worker = run.pool.workers[0]
            pid = worker.pid
            assert pid is not None
            (storage / "gone.bin").unlink()
            (mem / f".tmp-{pid}-entry").write_bytes(b"half an entry")
            (storage / f".cpnode-tmp-{pid}-file").write_bytes(bytes(3000))
            (mem / f".tmp-{os.getpid()}-live").write_bytes(b"a live writer's")
            with DiskStore(storage, MIB, ledger_dir, reserve_bytes=0) as disk:
                assert disk.used_bytes() == 5000  # counting a file that is not there
            os.kill(pid, signal.SIGKILL)
            # The pool sweeps in a thread once it sees the death: wait for its report.
            deadline = asyncio.get_running_loop().time() + 30
            while "unfinished store files of worker 0" not in caplog.text:
                assert asyncio.get_running_loop().time() < deadline, "no sweep after the death"
                await asyncio.sleep(0.02)
            assert run.pool.restarts_by_cause
            return sorted(os.listdir(mem)), sorted(os.listdir(storage))
        finally:
            await run.pool.stop()

    with claim_node_dir(SHM, node_id) as node_dir, caplog.at_level(logging.WARNING):
        mem = Path(node_dir.path, "mem")
        in_memory, on_disk = asyncio.run(scenario(mem, node_dir.ledger_dir))
        assert in_memory == [f".tmp-{os.getpid()}-live"]
        assert on_disk == []
        with DiskStore(storage, MIB, node_dir.ledger_dir, reserve_bytes=0) as disk:
            assert disk.used_bytes() == 0
        assert "removed 2 unfinished store files of worker 0" in caplog.text
        (mem / f".tmp-{os.getpid()}-live").unlink()
    assert ours_in_shm(node_id) == []


def test_the_memory_store_keeps_room_for_payload_segments(tmp_path: Path) -> None:
    if psutil.disk_usage(SHM).total >= 8 * SEGMENT_RESERVE_BYTES:
        assert memory_reserve_bytes(SHM) == SEGMENT_RESERVE_BYTES
    node_id = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with mounted_tmpfs(tmp_path / "tiny", "8m") as tiny, claim_node_dir(tiny, node_id):
        # A small shm_dir (a container's /dev/shm) keeps an eighth, not 64 MiB: still usable.
        assert memory_reserve_bytes(str(tiny)) == MIB
        settings = WorkerSettings(node_id=node_id, storage_dir=str(tmp_path), shm_dir=str(tiny))
        runner = TaskRunner(settings)
        try:

            def run(task: m.Task) -> m.Result:
                answer = runner.run_payload(codec.encode_payload(m.AssignTask("t", task)))
                message = codec.decode(bytes(answer))  # a big `Bytes` streams: join it
                assert isinstance(message, m.TaskResult)
                return message.result

            assert run(m.StoreData("a", bytes(6 * MIB))) == m.Stored()
            full = run(m.StoreData("b", bytes(MIB + MIB // 2)))  # fits the tmpfs, not the reserve
            assert isinstance(full, m.Error)
            assert "keep 1048576 bytes free" in full.message
            assert run(m.RetrieveData("a")) == m.Bytes(bytes(6 * MIB))
            assert run(m.RetrieveData("b")) == m.Error("Key not found")
        finally:
            runner.storage.close()
