"""Config and join.json loading: defaults, upstream files, every refusal with its exact message."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.config import (
    CONFIG_FIELDS,
    MIN_TASK_TIMEOUT_MS,
    Config,
    JoinInfo,
    Role,
    check_node_paths,
    config_reference_markdown,
    format_address,
    is_local_ip,
    load_config,
    load_join,
    parse_address,
    parse_role,
    write_join,
)
from node.errors import ConfigError, CpnodeError
from tests.nodeproc import NodeProcess
from tests.scripted import ScriptedMaster, stop_node

DATA = Path(__file__).parent / "data"

DEFAULTS = {
    "min_port": 55001,
    "max_port": 55999,
    "failover_timeout_ms": 5000,
    "master_addresses": ("127.0.0.1:55000",),
    "peer_masters": None,
    "ca_cert_path": None,
    "ca_cert": None,
    "cert_path": None,
    "key_path": None,
    "internet_ports": None,
    "storage_dir": "storage",
    "state_file": "master_state.json",
    "disk_space_mb": 1024,
    "role": Role.Worker,
    "max_retries": 5,
    "retry_interval_ms": 5000,
    "log_level": "info",
    "workers": None,
    "task_timeout_ms": 60000,
    "max_tasks_per_child": 0,
    "worker_memory_limit_mb": 0,
    "max_frame_bytes": 1073741824,
    "poll_interval_ms": 50,
    "prefetch": 1024,
    "shm_dir": "/dev/shm",
    "node_id": None,
    "drain_timeout_ms": 30000,
    "health_listen": None,
    "log_format": "text",
    "tls": "auto",
    "io_concurrency": 256,
    "http_max_body_bytes": 16 << 20,
    "tcp_read_bytes": 1024,
    "network_allow": ("0.0.0.0/0", "::/0"),
    "network_deny": ("169.254.0.0/16", "fe80::/10"),
    "direct_port": None,
    "direct_host": "0.0.0.0",
    "connect_to": (),
    "direct_window": 256,
    "result_ttl_s": 3600,
    "window": 1024,
}


def write(path: Path, document: object) -> Path:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


# --- defaults and upstream files ---------------------------------------------------------------


def test_defaults_are_upstreams_plus_ours() -> None:
    assert dataclasses.asdict(load_config(None)) == DEFAULTS
    assert load_config(None) == Config()
    assert [spec.name for spec in CONFIG_FIELDS] == list(DEFAULTS)


@pytest.mark.parametrize("name", ["upstream-node-config.json", "upstream-master-config.json"])
def test_upstream_sample_loads_unchanged(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cpnode.config")
    document = json.loads((DATA / name).read_text())

    config = load_config(DATA / name)

    for field, value in document.items():
        expected = DEFAULTS[field] if value is None else value
        got = getattr(config, field)
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(expected) if isinstance(expected, tuple) else expected
        ), field
    assert config.failover_timeout_ms == 7000
    assert config.role is Role.Worker
    # Both samples hold only fields of upstream's Config, so nothing is reported unknown.
    assert caplog.messages == []


def test_unknown_fields_are_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cpnode.config")
    document = json.loads((DATA / "upstream-master-config.json").read_text())
    document |= {"listen_backlog": 128, "tls_options": {"enabled": True}}
    path = write(tmp_path / "config.json", document)

    config = load_config(path)

    assert config.state_file == "master_state.json"
    assert caplog.messages == [
        f"{path}: ignoring unknown field `listen_backlog`",
        f"{path}: ignoring unknown field `tls_options`",
    ]
    assert all(record.name == "cpnode.config" for record in caplog.records)


def test_null_means_the_default(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config.json",
        {"role": None, "storage_dir": None, "workers": None, "master_addresses": None},
    )
    assert load_config(path) == Config()


def test_values_are_canonicalised(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config.json",
        {"role": "Disk", "log_level": "DEBUG", "internet_ports": [8080, 8081], "workers": 3},
    )
    config = load_config(path)
    assert config.role is Role.Disk
    assert config.log_level == "debug"
    assert config.internet_ports == (8080, 8081)
    assert config.worker_count == 3
    assert hash(config) == hash(load_config(path))


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'\xef\xbb\xbf{"max_retries": 1}')
    assert load_config(path).max_retries == 1


# --- refusals ----------------------------------------------------------------------------------

ADDRESS = 'a "host:port" address (IPv6 as "[::1]:55000")'

BAD_CONFIGS = [
    pytest.param(
        '{\n  "min_port": 55001,\n  "max_port": \n}',
        "{path}: not valid JSON: Expecting value at line 4 column 1",
        id="bad-json",
    ),
    pytest.param(
        '{"min_port": 55001 "max_port": 55999}',
        "{path}: not valid JSON: Expecting ',' delimiter at line 1 column 20",
        id="bad-json-delimiter",
    ),
    pytest.param("", "{path}: not valid JSON: Expecting value at line 1 column 1", id="empty"),
    pytest.param(
        '{"failover_timeout_ms": NaN}',
        "{path}: not valid JSON: NaN is not a JSON value",
        id="nan",
    ),
    pytest.param(
        '{"role": "Disk", "role": "Worker"}',
        "{path}: field `role` appears more than once",
        id="duplicate-field",
    ),
    pytest.param(
        "[1, 2]", "{path}: the top level must be a JSON object, got an array", id="top-level-array"
    ),
    pytest.param(
        {"failover_timeout_ms": "5000"},
        '{path}: `failover_timeout_ms` must be a positive integer, got "5000"',
        id="string-for-int",
    ),
    pytest.param(
        {"failover_timeout_ms": 5000.0},
        "{path}: `failover_timeout_ms` must be a positive integer, got 5000.0",
        id="float-for-int",
    ),
    pytest.param(
        {"max_retries": True},
        "{path}: `max_retries` must be a non-negative integer, got true",
        id="bool-for-int",
    ),
    pytest.param(
        {"disk_space_mb": -5},
        "{path}: `disk_space_mb` must be a non-negative integer, got -5",
        id="negative-quota",
    ),
    pytest.param(
        {"failover_timeout_ms": 0},
        "{path}: `failover_timeout_ms` must be a positive integer, got 0",
        id="zero-timeout",
    ),
    pytest.param(
        {"max_port": 70000},
        "{path}: `max_port` must be an integer from 1 to 65535, got 70000",
        id="port-out-of-range",
    ),
    pytest.param(
        {"min_port": 56000, "max_port": 55000},
        "{path}: `min_port` (56000) must not be greater than `max_port` (55000)",
        id="min-above-max",
    ),
    pytest.param(
        {"min_port": 56000},
        "{path}: `min_port` (56000) must not be greater than `max_port` (55999)",
        id="min-above-default-max",
    ),
    pytest.param(
        {"role": "Master"},
        '{path}: `role` must be one of "Worker", "Disk", "Internet", got "Master"',
        id="unknown-role",
    ),
    pytest.param(
        {"role": "disk"},
        '{path}: `role` must be one of "Worker", "Disk", "Internet", got "disk"'
        ' (role names are case-sensitive: "Disk")',
        id="lowercase-role",
    ),
    pytest.param(
        {"master_addresses": ["127.0.0.1"]},
        f'{{path}}: `master_addresses[0]` must be {ADDRESS}, got "127.0.0.1" (missing ":port")',
        id="address-without-port",
    ),
    pytest.param(
        {"master_addresses": ["10.0.0.1:55000", "::1:55000"]},
        f'{{path}}: `master_addresses[1]` must be {ADDRESS}, got "::1:55000"'
        ' (an IPv6 address needs brackets, as in "[::1]:55000")',
        id="ipv6-without-brackets",
    ),
    pytest.param(
        {"master_addresses": ["master:0"]},
        f'{{path}}: `master_addresses[0]` must be {ADDRESS}, got "master:0"'
        " (port 0 is out of range 1-65535)",
        id="address-port-zero",
    ),
    pytest.param(
        {"peer_masters": ["300.1.1.1:55000"]},
        f'{{path}}: `peer_masters[0]` must be {ADDRESS}, got "300.1.1.1:55000"'
        ' ("300.1.1.1" is not an IPv4 address)',
        id="bad-ipv4",
    ),
    pytest.param(
        {"master_addresses": []},
        '{path}: `master_addresses` must be a non-empty list of "host:port" addresses, got []',
        id="no-master",
    ),
    pytest.param(
        {"master_addresses": "127.0.0.1:55000"},
        '{path}: `master_addresses` must be a non-empty list of "host:port" addresses,'
        ' got "127.0.0.1:55000"',
        id="address-not-in-list",
    ),
    pytest.param(
        {"internet_ports": [8080, 8080]},
        "{path}: `internet_ports` must be a list of distinct ports (1-65535),"
        " got [8080, 8080] (8080 is listed twice)",
        id="port-twice",
    ),
    pytest.param(
        {"internet_ports": [8080, 0]},
        "{path}: `internet_ports[1]` must be an integer from 1 to 65535, got 0",
        id="internet-port-zero",
    ),
    pytest.param(
        {"log_level": "verbose"},
        '{path}: `log_level` must be one of "error", "warn", "info", "debug", "trace" or "off",'
        ' got "verbose"',
        id="bad-log-level",
    ),
    pytest.param(
        {"storage_dir": ""},
        '{path}: `storage_dir` must be a path (a non-empty string without NUL characters), got ""',
        id="empty-storage-dir",
    ),
    pytest.param(
        {"storage_dir": "data\u0000x"},
        "{path}: `storage_dir` must be a path (a non-empty string without NUL characters), got "
        '"data\\u0000x"',
        id="nul-in-storage-dir",
    ),
    pytest.param(
        {"ca_cert_path": 5},
        "{path}: `ca_cert_path` must be a path (a non-empty string without NUL characters), got 5",
        id="number-for-path",
    ),
    pytest.param(
        {"node_id": "../other"},
        '{path}: `node_id` must be a name of 1-64 letters, digits, ".", "_" or "-",'
        ' starting with a letter or digit, got "../other"',
        id="node-id-escapes",
    ),
    pytest.param(
        {"task_timeout_ms": 3},
        "{path}: `task_timeout_ms` must be 0 (off) or an integer of at least 100, got 3 (a worker "
        "sends the results it finished every 20 ms while a long task runs: a shorter limit would "
        "kill workers still holding them)",
        id="task-timeout-below-the-flush-period",
    ),
    pytest.param(
        {"task_timeout_ms": -1},
        "{path}: `task_timeout_ms` must be 0 (off) or an integer of at least 100, got -1",
        id="negative-task-timeout",
    ),
    pytest.param(
        {"workers": 0, "disk_space_mb": -1},
        "{path}: `workers` must be a positive integer, got 0\n"
        "{path}: `disk_space_mb` must be a non-negative integer, got -1",
        id="every-problem-listed",
    ),
]


@pytest.mark.parametrize(("document", "message"), BAD_CONFIGS)
def test_bad_config_is_refused(tmp_path: Path, document: object, message: str) -> None:
    path = write(tmp_path / "config.json", document)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == message.format(path=path)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: config file not found"


def test_unreadable_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_config_error_is_a_cpnode_error() -> None:
    assert issubclass(ConfigError, CpnodeError)


# --- overrides and direct construction ---------------------------------------------------------


def test_overrides_replace_file_values(tmp_path: Path) -> None:
    path = write(tmp_path / "config.json", {"role": "Disk", "workers": 2, "max_retries": 1})
    config = load_config(path, overrides={"role": Role.Internet, "workers": 8, "max_retries": None})
    assert (config.role, config.workers, config.max_retries) == (Role.Internet, 8, 1)


def test_overrides_without_file() -> None:
    config = load_config(None, overrides={"master_addresses": ["[::1]:55000", "m2:55000"]})
    assert config.master_addresses == ("[::1]:55000", "m2:55000")
    assert config.master_endpoints == (("::1", 55000), ("m2", 55000))


def test_bad_override_names_the_override(tmp_path: Path) -> None:
    path = write(tmp_path / "config.json", {"min_port": 55500})
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides={"workers": 0, "max_port": 55100})
    assert str(caught.value) == (
        "override: `workers` must be a positive integer, got 0\n"
        f"{path} and override: `min_port` (55500) must not be greater than `max_port` (55100)"
    )


def test_a_bad_flag_is_named_as_from_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "--workers", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    expected = "cpnode-supervisor: command line: `workers` must be a positive integer, got 0"
    assert done.stderr.strip() == expected


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides={"wrokers": 4})
    assert str(caught.value) == "override: unknown field `wrokers`"


def test_direct_construction_is_checked() -> None:
    config = Config(internet_ports=[9000], role=Role.Disk)  # type: ignore[arg-type]
    assert config.internet_ports == (9000,)
    with pytest.raises(ConfigError) as caught:
        dataclasses.replace(config, prefetch=0)
    assert str(caught.value) == "Config: `prefetch` must be a positive integer, got 0"


def test_derived_values() -> None:
    config = Config(log_level="trace")
    assert config.logging_level == 5
    assert Config().logging_level == logging.INFO
    assert Config(log_level="warn").logging_level == logging.WARNING
    assert config.worker_count == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("Worker", Role.Worker),
        ("disk", Role.Disk),
        ("INTERNET", Role.Internet),
        (" Disk ", Role.Disk),
    ],
)
def test_role_parse_accepts_any_case(text: str, role: Role) -> None:
    assert parse_role(text) is role
    assert str(role) == role.value


def test_role_parse_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_role("storage")
    assert (
        str(caught.value)
        == "unknown role 'storage': expected one of Worker, Disk, Internet (any case)"
    )


# --- reference ---------------------------------------------------------------------------------


def test_reference_lists_every_field_with_its_default() -> None:
    reference = config_reference_markdown()
    rows = reference.splitlines()
    assert rows[0].startswith("| Field | Default |")
    assert len(rows) == 2 + len(dataclasses.fields(Config))
    for field, row in zip(dataclasses.fields(Config), rows[2:], strict=True):
        assert row.startswith(f"| `{field.name}` | `")
        assert row.count(" | ") == 4
    assert "| `max_frame_bytes` | `1073741824` |" in reference
    assert '| `master_addresses` | `["127.0.0.1:55000"]` |' in reference
    assert '| `role` | `"Worker"` |' in reference


# --- join.json ---------------------------------------------------------------------------------

JOIN = {"token": "s3cret", "ip": "192.168.1.5", "port": 55000}


def test_join_from_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "join.json", JOIN)
    info = load_join(env={})
    assert info == JoinInfo("s3cret", "192.168.1.5", 55000)
    assert info.address == "192.168.1.5:55000"
    assert info.is_local


def test_join_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "elsewhere.json", JOIN)
    monkeypatch.setenv("CPCLUSTER_JOIN", str(path))
    monkeypatch.delenv("CPCLUSTER_TOKEN", raising=False)
    assert load_join().token == "s3cret"


def test_explicit_join_path_beats_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.json", JOIN)
    env = {"CPCLUSTER_JOIN": str(tmp_path / "other.json")}
    assert load_join(path, env=env).ip == "192.168.1.5"


def test_a_join_file_others_may_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "join.json", JOIN)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="cpnode.config"):
        assert load_join(path, env={}).token == "s3cret"
    assert f"{path} holds the cluster's token and other users may read it (mode 644)" in (
        caplog.text
    )
    caplog.clear()
    path.chmod(0o600)
    load_join(path, env={})
    path.chmod(0o644)
    load_join(path, env={"CPCLUSTER_TOKEN": "t"})  # the file's token is not used
    assert "other users may read it" not in caplog.text


def test_token_from_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path / "join.json", JOIN)
    assert load_join(path, env={"CPCLUSTER_TOKEN": "from-env"}).token == "from-env"
    bare = write(tmp_path / "bare.json", {"ip": "10.1.2.3", "port": 55001})
    assert load_join(bare, env={"CPCLUSTER_TOKEN": "t"}) == JoinInfo("t", "10.1.2.3", 55001)


def test_token_alone_means_local_master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    info = load_join(env={"CPCLUSTER_TOKEN": "t"})
    assert (info.token, info.ip, info.port) == ("t", "127.0.0.1", 55000)


def test_named_join_file_must_exist_even_with_token(tmp_path: Path) -> None:
    missing = tmp_path / "typo.json"
    env = {"CPCLUSTER_TOKEN": "t", "CPCLUSTER_JOIN": str(missing)}
    with pytest.raises(ConfigError) as caught:
        load_join(env=env)
    assert str(caught.value) == f"{missing}: join file not found"


def test_empty_token_in_environment_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "join.json", JOIN)
    with pytest.raises(ConfigError) as caught:
        load_join(path, env={"CPCLUSTER_TOKEN": " "})
    assert str(caught.value) == (
        "CPCLUSTER_TOKEN is set but empty: unset it, or set it to the master's token"
    )


def test_join_ipv6_and_unknown_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cpnode.config")
    path = write(tmp_path / "join.json", {"token": "t", "ip": "[::1]", "port": 55000, "x": 1})
    path.chmod(0o600)  # or it is warned of too
    info = load_join(path, env={})
    assert (info.ip, info.address, info.is_local) == ("::1", "[::1]:55000", True)
    assert caplog.messages == [f"{path}: ignoring unknown field `x`"]


def test_join_repr_hides_the_token() -> None:
    assert "s3cret" not in repr(JoinInfo("s3cret", "127.0.0.1", 55000))


BAD_JOINS = [
    pytest.param(
        '{"token": "t", "ip": ',
        "{path}: not valid JSON: Expecting value at line 1 column 22",
        id="bad-json",
    ),
    pytest.param(
        '"token"', "{path}: the top level must be a JSON object, got a string", id="not-object"
    ),
    pytest.param(
        {"ip": "127.0.0.1", "port": 55000},
        "{path}: missing field `token` (a non-empty string)",
        id="no-token",
    ),
    pytest.param(
        {"token": "t", "port": 55000},
        "{path}: missing field `ip` (an IP address or host name)",
        id="no-ip",
    ),
    pytest.param(
        {"token": "t", "ip": "127.0.0.1"},
        "{path}: missing field `port` (an integer from 1 to 65535)",
        id="no-port",
    ),
    pytest.param(
        {"token": "", "ip": "127.0.0.1", "port": 55000},
        '{path}: `token` must be a non-empty string, got ""',
        id="empty-token",
    ),
    pytest.param(  # a token that is no string is not shown: messages reach logs
        {"token": 123456789, "ip": "127.0.0.1", "port": 55000},
        "{path}: `token` must be a non-empty string, got a number (not shown)",
        id="number-token",
    ),
    pytest.param(
        {"token": "t", "ip": "127.0.0.1", "port": 70000},
        "{path}: `port` must be an integer from 1 to 65535, got 70000",
        id="port-out-of-range",
    ),
    pytest.param(
        {"token": "t", "ip": "127.0.0.1", "port": "55000"},
        '{path}: `port` must be an integer from 1 to 65535, got "55000"',
        id="port-string",
    ),
    pytest.param(
        {"token": "t", "ip": "127.0.0.1:55000", "port": 55000},
        '{path}: `ip` must be an IP address or host name, got "127.0.0.1:55000"'
        " (the port belongs in `port`)",
        id="ip-with-port",
    ),
]


@pytest.mark.parametrize(("document", "message"), BAD_JOINS)
def test_bad_join_is_refused(tmp_path: Path, document: object, message: str) -> None:
    path = write(tmp_path / "join.json", document)
    with pytest.raises(ConfigError) as caught:
        load_join(path, env={})
    assert str(caught.value) == message.format(path=path)


def test_missing_join_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_join(env={})
    assert str(caught.value) == "join.json: join file not found"


def test_write_join_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "join.json"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        write_join(path, JoinInfo("s3cret", "::1", 55000))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"token": "s3cret", "ip": "::1", "port": 55000}
    assert load_join(path, env={}) == JoinInfo("s3cret", "::1", 55000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["join.json"]


def test_write_join_reports_failure(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "join.json"
    with pytest.raises(ConfigError) as caught:
        write_join(path, JoinInfo("t", "127.0.0.1", 55000))
    assert str(caught.value) == f"{path}: cannot write join file: No such file or directory"


# --- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("172.31.255.255", True),
        ("172.32.0.1", False),
        ("172.15.255.255", False),
        ("192.168.5.6", True),
        ("192.169.0.1", False),
        ("8.8.8.8", False),
        ("169.254.1.1", False),
        ("100.64.0.1", False),
        ("::1", True),
        ("[::1]", True),
        ("fc00::1", True),
        ("fd12:3456::1", True),
        ("fe80::1", False),
        ("2001:4860:4860::8888", False),
        ("::ffff:127.0.0.1", False),
        ("localhost", True),
        ("LocalHost.", True),
        ("node.localhost", True),
        ("master.example.com", False),
        ("", False),
    ],
)
def test_is_local_ip(host: str, local: bool) -> None:
    assert is_local_ip(host) is local


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:55000", ("127.0.0.1", 55000)),
        ("master:1", ("master", 1)),
        ("cp_master.local:65535", ("cp_master.local", 65535)),
        ("[::1]:55000", ("::1", 55000)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_parse_address(text: str, parsed: tuple[str, int]) -> None:
    assert parse_address(text) == parsed
    assert format_address(*parsed) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1", 'missing ":port"'),
        ("127.0.0.1:", "missing port number"),
        (":55000", "missing host"),
        ("::1:55000", 'an IPv6 address needs brackets, as in "[::1]:55000"'),
        ("[::1]55000", 'missing ":port" after "]"'),
        ("[::1:55000", 'missing "]"'),
        ("[1.2.3.4]:80", '"1.2.3.4" is not an IPv6 address'),
        ("host:http", 'port "http" is not a number from 1 to 65535'),
        ("host:65536", "port 65536 is out of range 1-65535"),
        ("bad host:1", "contains whitespace"),
        ("-bad-:1", '"-bad-" is not a host name'),
        ("", "empty"),
    ],
)
def test_parse_address_refusals(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_address(text)
    assert str(caught.value) == f"invalid address {text!r}: {reason}"


@given(st.ip_addresses(), st.integers(1, 65535))
def test_format_and_parse_round_trip(ip: object, port: int) -> None:
    host = str(ip)
    assert parse_address(format_address(host, port)) == (host, port)


@pytest.mark.parametrize(
    ("storage", "shm", "refused"),
    [
        ("{t}/shm", "{t}/shm", "holds `shm_dir`"),  # DiskWrite could reach cpnode-<id>/...
        ("{t}", "{t}/shm", "holds `shm_dir`"),
        ("{t}/shm/cpnode-n1/mem", "{t}/shm", "a node's own directory"),
        ("{t}/link-to-shm", "{t}/shm", "holds `shm_dir`"),  # a symlink to it
        ("{t}/shm/cpcluster", "{t}/shm", None),  # upstream's tmpfs channel: fine
        ("{t}/storage", "{t}/shm", None),
        ("{t}/shm-other", "{t}/shm", None),  # a prefix of the name is no parent
    ],
)
def test_storage_dir_may_not_reach_the_nodes_files_in_shm_dir(
    tmp_path: Path, storage: str, shm: str, refused: str | None
) -> None:
    (tmp_path / "shm").mkdir()
    (tmp_path / "link-to-shm").symlink_to(tmp_path / "shm")
    config = Config(storage_dir=storage.format(t=tmp_path), shm_dir=shm.format(t=tmp_path))
    if refused is None:
        check_node_paths(config)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_node_paths(config)


def test_task_timeout_ms_is_off_or_at_least_the_smallest_limit() -> None:
    assert Config(task_timeout_ms=0).task_timeout_ms == 0
    assert Config(task_timeout_ms=MIN_TASK_TIMEOUT_MS).task_timeout_ms == MIN_TASK_TIMEOUT_MS
    with pytest.raises(ConfigError, match="at least 100, got 99"):
        Config(task_timeout_ms=MIN_TASK_TIMEOUT_MS - 1)


def test_the_node_refuses_a_task_timeout_ms_below_the_smallest_limit(tmp_path: Path) -> None:
    (tmp_path / "join.json").write_text('{"token":"t","ip":"127.0.0.1","port":1}')
    process = NodeProcess(tmp_path, tmp_path / "join.json", {"task_timeout_ms": 3})
    try:
        assert process.proc.wait(30) == 2
        assert (
            f"{process.config_path}: `task_timeout_ms` must be 0 (off) or an integer of at "
            "least 100, got 3"
        ) in process.log
    finally:
        process.close()


@pytest.mark.parametrize(
    ("settings", "flags"),
    [
        pytest.param({"foo": 1}, ("--log-format", "json"), id="json-from-the-command-line"),
        pytest.param({"foo": 1, "log_format": "json"}, (), id="json-from-the-file"),
    ],
)
def test_the_nodes_config_warnings_are_in_its_log_format(
    tmp_path: Path, settings: dict[str, object], flags: tuple[str, ...]
) -> None:
    # The unknown field's warning came before logging was set up, as a plain-text line that a
    # JSON log reader (`journalctl ... | jq`) stops at.
    master = ScriptedMaster()
    join = tmp_path / "join.json"
    master.write_join(join)
    settings |= {
        "failover_timeout_ms": 60_000,
        "master_addresses": [f"127.0.0.1:{master.port}"],
        "storage_dir": str(tmp_path / "storage"),
    }
    node = NodeProcess(tmp_path, join, settings, "--workers", "1", *flags)
    try:
        master.accept()
        node.wait_for_log("node ready")
        node.record_children()
        assert stop_node(node, master) == 0
        records = [json.loads(line) for line in node.log.splitlines()]  # each line one object
        warning = f"{node.config_path}: ignoring unknown field `foo`"
        assert [r | {"ts": ""} for r in records if warning in r["message"]] == [
            {
                "ts": "",
                "level": "warn",
                "logger": "cpnode.config",
                "message": warning,
                "pid": node.proc.pid,
            }
        ]
        assert node.leftover_children() == []
    finally:
        node.close()
        master.close()


def test_the_node_refuses_a_storage_dir_that_holds_shm_dir(tmp_path: Path) -> None:
    (tmp_path / "join.json").write_text('{"token":"t","ip":"127.0.0.1","port":1}')
    config = {"storage_dir": str(tmp_path / "shm"), "shm_dir": str(tmp_path / "shm")}
    process = NodeProcess(tmp_path, tmp_path / "join.json", config)
    try:
        assert process.proc.wait(30) == 2
        assert "`storage_dir`" in process.log and "holds `shm_dir`" in process.log
        assert f"{process.config_path}: `storage_dir`" in process.log  # names the file
    finally:
        process.close()
