"""Unit tests for deploy.launch: argv building, validation, insecure refusal."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from deploy import launch as la

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def creds(tmp_path) -> Path:
    from deploy import credentials

    out = tmp_path / "creds"
    credentials.create_all(out, nodes=["hospital-a"])
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.launch", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def _link_spec(creds: Path, tmp_path: Path, **kw) -> la.SuperLinkSpec:
    return la.SuperLinkSpec(state_dir=tmp_path / "state", ca_cert=creds / "ca.crt",
                            cert=creds / "superlink.crt",
                            key=creds / "superlink.key", **kw)


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_superlink_argv_is_secure_by_default(creds, tmp_path):
    argv = la.superlink_argv(_link_spec(creds, tmp_path, port=9999), "flower-superlink")
    assert argv[0] == "flower-superlink"
    assert _opt(argv, "--ssl-ca-certfile") == str(creds / "ca.crt")
    assert _opt(argv, "--ssl-certfile") == str(creds / "superlink.crt")
    assert _opt(argv, "--ssl-keyfile") == str(creds / "superlink.key")
    assert "--enable-supernode-auth" in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert _opt(argv, "--database") == str(tmp_path / "state" / la.STATE_DB)
    assert _opt(argv, "--port") == "9999"
    assert "--insecure" not in argv


def test_superlink_argv_refuses_insecure_without_ack(creds, tmp_path):
    with pytest.raises(la.LaunchError, match=la.INSECURE_ACK_FLAG):
        la.superlink_argv(_link_spec(creds, tmp_path, insecure=True), "x")
    argv = la.superlink_argv(
        _link_spec(creds, tmp_path, insecure=True, i_understand_insecure=True), "x")
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv


def test_superlink_argv_missing_cert_names_flag(tmp_path):
    spec = la.SuperLinkSpec(state_dir=tmp_path, ca_cert=tmp_path / "nope.crt",
                            cert=tmp_path / "a", key=tmp_path / "b")
    with pytest.raises(la.LaunchError, match=r"nope\.crt.*--ca"):
        la.superlink_argv(spec, "x")


def test_supernode_argv(creds, tmp_path):
    data = tmp_path / "site.npz"
    data.write_bytes(b"x")
    node = la.NodeConfig("hospital-a", f"npz:{data}", tmp_path / "cache")
    spec = la.SuperNodeSpec(superlink="link.example.org:9093", node=node,
                            ca_cert=creds / "ca.crt",
                            private_key=creds / "hospital-a.key", port=9200)
    argv = la.supernode_argv(spec, "flower-supernode")
    assert _opt(argv, "--superlink") == "link.example.org:9093"
    assert _opt(argv, "--root-certificates") == str(creds / "ca.crt")
    assert _opt(argv, "--auth-supernode-private-key") == str(
        creds / "hospital-a.key")
    assert _opt(argv, "--port") == "9200"
    assert _opt(argv, "--node-config") == (
        f'site="hospital-a" data-source="npz:{data}" '
        f'cache-dir="{tmp_path / "cache"}"')
    assert "--insecure" not in argv


def test_node_config_round_trips_through_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    node = la.NodeConfig("hospital-a", "folder:/data/x-ray", tmp_path / "c")
    parsed = parse_config_args([node.as_flower_arg()])
    assert parsed == {"site": "hospital-a", "data-source": "folder:/data/x-ray",
                      "cache-dir": str(tmp_path / "c")}


@pytest.mark.parametrize("source,match", [
    ("npz:/definitely/missing.npz", "not a readable file"),
    ("folder:/definitely/missing", "not a directory"),
    ("s3://bucket/x", "not br35h"),
    ("", "empty"),
])
def test_node_config_rejects_bad_sources(tmp_path, source, match):
    with pytest.raises(la.LaunchError, match=match):
        la.validate_node_config(la.NodeConfig("a", source, tmp_path))


def test_node_config_accepts_good_sources(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f.npz").write_bytes(b"x")
    for source in ("br35h", f"npz:{tmp_path / 'f.npz'}", f"folder:{tmp_path / 'd'}"):
        la.validate_node_config(la.NodeConfig("a", source, tmp_path / "c"))


def test_node_config_rejects_whitespace(tmp_path):
    with pytest.raises(la.LaunchError, match="whitespace"):
        la.validate_node_config(la.NodeConfig("my site", "br35h", tmp_path))


def test_supernode_superlink_address_checked(creds, tmp_path):
    node = la.NodeConfig("a", "br35h", tmp_path)
    for bad in ("https://link:9093", "link"):
        with pytest.raises(la.LaunchError, match="host:port"):
            la.supernode_argv(la.SuperNodeSpec(superlink=bad, node=node,
                                               ca_cert=creds / "ca.crt",
                                               private_key=creds / "x"), "x")


def test_launch_env_sets_home_and_telemetry(tmp_path):
    env = la.launch_env(tmp_path / "home", base={"PATH": "/usr/bin"})
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env[la.SUPEREXEC_POLL_ENV] == "0.2"  # not Flower's 1 s per message
    own = {"PATH": "/usr/bin", la.SUPEREXEC_POLL_ENV: "0.5"}
    assert la.launch_env(tmp_path, base=own)[la.SUPEREXEC_POLL_ENV] == "0.5"


def test_connection_toml_parses_with_flower(tmp_path, creds, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "home"
    la.write_connection(home, "fedkd", "link.example.org:9093", creds / "ca.crt")
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection(None)
    assert conn.name == "fedkd" and conn.address == "link.example.org:9093"
    assert conn.root_certificates == str((creds / "ca.crt").resolve())
    with pytest.raises(la.LaunchError, match="--force"):
        la.write_connection(home, "fedkd", "x:1", creds / "ca.crt")


def test_cli_superlink_insecure_is_refused(tmp_path):
    res = _cli("superlink", "--state", str(tmp_path), "--insecure")
    assert res.returncode != 0
    assert la.INSECURE_ACK_FLAG in res.stderr
    assert "refusing" in res.stderr
    assert not (tmp_path / la.STATE_DB).exists()


def test_cli_superlink_dry_run(creds, tmp_path):
    res = _cli("superlink", "--state", str(tmp_path), "--creds", str(creds),
               "--port", "9555", "--dry-run")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert "FLWR_TELEMETRY_ENABLED=0" in line and "FLWR_HOME=" in line
    assert "--enable-supernode-auth" in line and "--port 9555" in line


def test_cli_supernode_validates_before_start(creds, tmp_path):
    res = _cli("supernode", "--state", str(tmp_path), "--superlink", "l:9093",
               "--ca", str(creds / "ca.crt"), "--key", str(creds / "hospital-a.key"),
               "--site", "a", "--data-source", "npz:/missing.npz",
               "--cache-dir", str(tmp_path / "c"), "--dry-run")
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "/missing.npz" in res.stderr


def test_node_config_carries_the_sites_cpu_threads(tmp_path):
    from flwr.common.config import parse_config_args

    node = la.NodeConfig("hospital-a", "br35h", tmp_path / "c", num_threads=3)
    parsed = parse_config_args([node.as_flower_arg()])
    assert parsed["num-threads"] == "3"
    assert "num-threads" not in la.NodeConfig("a", "br35h", tmp_path).as_flower_arg()
    with pytest.raises(la.LaunchError, match="num-threads=-1"):
        la.validate_node_config(la.NodeConfig("a", "br35h", tmp_path, num_threads=-1))


def test_cli_supernode_with_a_worker_names_its_socket(creds, tmp_path):
    state = Path(tempfile.mkdtemp(dir="/tmp"))  # a short path: sockets hold 107 B
    res = _cli("supernode", "--state", str(state), "--superlink", "l:9093",
               "--ca", str(creds / "ca.crt"), "--key", str(creds / "hospital-a.key"),
               "--site", "a", "--data-source", "br35h", "--worker",
               "--num-threads", "1", "--cache-dir", str(tmp_path / "c"), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert f'worker-socket="{state / la.WORKER_SOCKET}"' in res.stdout
    assert 'num-threads="1"' in res.stdout


def test_a_worker_socket_path_too_long_for_unix_is_refused(tmp_path):
    node = la.NodeConfig("a", "br35h", tmp_path, worker_socket=Path("/" + "x" * 120))
    with pytest.raises(la.LaunchError, match="longer than 107"):
        la.validate_node_config(node)


def test_cli_supernode_with_a_short_poll_runs_flowers_through_deploy_supernode(
    creds, tmp_path
):
    res = _cli("supernode", "--state", str(tmp_path / "s"), "--superlink", "l:9093",
               "--ca", str(creds / "ca.crt"), "--key", str(creds / "hospital-a.key"),
               "--site", "a", "--data-source", "br35h", "--poll", "0.2",
               "--cache-dir", str(tmp_path / "c"), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "-m deploy.supernode --poll 0.2 --superlink l:9093" in res.stdout
    assert "--auth-supernode-private-key" in res.stdout  # TLS + auth as always
    bad = _cli("supernode", "--state", str(tmp_path / "s"), "--superlink", "l:9093",
               "--ca", str(creds / "ca.crt"), "--key", str(creds / "hospital-a.key"),
               "--site", "a", "--data-source", "br35h", "--poll", "5",
               "--cache-dir", str(tmp_path / "c"), "--dry-run")
    assert bad.returncode == 2 and "--poll 5 is outside [0.01, 3]" in bad.stderr


def test_the_poll_patch_shortens_only_flowers_idle_sleeps(monkeypatch):
    import time

    import flwr
    from flwr.supernode import start_client_internal as internal

    from deploy import supernode

    monkeypatch.setattr(internal, "time", time)  # undone after the test
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert supernode.patch_polls(0.2)
    internal.time.sleep(3)
    internal.time.sleep(0.5)
    internal.time.sleep(1.25)  # not one of the idle polls: unchanged
    assert slept == [0.2, 0.2, 1.25]
    assert internal.time.monotonic is time.monotonic  # the rest is `time`

    monkeypatch.setattr(internal, "time", time)
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    assert not supernode.patch_polls(0.2)  # another Flower: left alone
    assert internal.time is time


@pytest.mark.parametrize("argv,match", [
    (["--superlink", "l:9093"], "usage"),
    (["--poll", "0"], r"outside \[0.01, 3\]"),
    (["--poll", "x"], "could not convert"),
])
def test_deploy_supernode_needs_a_poll_first(argv, match):
    from deploy.supernode import parse_poll

    with pytest.raises(ValueError, match=match):
        parse_poll(argv)
