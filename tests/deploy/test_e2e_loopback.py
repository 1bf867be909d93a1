"""End-to-end on loopback: SuperLink + 2 SuperNodes, TLS and SuperNode auth on.

One federation (module fixture) serves all tests: the throwaway 2-parameter
FedAvg app, the project's real app, and the negative tests (unregistered key,
missing CA). Every process is killed by process group on teardown.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deploy import credentials
from tests.deploy import harness as h

REPO = Path(__file__).resolve().parents[2]
PNEUMONIA = REPO.parent / "shared" / "data" / "pneumoniamnist_balanced.npz"
SITES = ["hospital-a", "hospital-b"]
RUN_TIMEOUT = 900  # hard cap per federated run (seconds; 2 busy CPU cores)

pytestmark = pytest.mark.skipif(
    not PNEUMONIA.is_file(),
    reason=f"shared data {PNEUMONIA} absent: the e2e test needs real site data",
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    procs = h.Procs()
    try:
        h.write_npz_halves(PNEUMONIA, root / "hospital-a.npz",
                           root / "hospital-b.npz")
        federation = h.start_federation(root, procs, SITES)
        credentials.create_supernode_keys(federation.creds, "intruder")
        for site in SITES:
            federation.register(site)
        for site in SITES:  # hospital-a: a warm worker and a 0.2 s idle poll;
            # hospital-b: as Flower ships it (a process per message, 3 s poll)
            fast = site == "hospital-a"
            federation.start_supernode(site, f"npz:{root / (site + '.npz')}",
                                       worker=fast, poll=0.2 if fast else None)
        federation.wait_online(2, timeout=90)
        yield federation
    except Exception:
        print(h.dump_logs(procs))
        raise
    finally:
        procs.stop_all()


def _fail_with_logs(fed: h.Federation, msg: str) -> None:
    pytest.fail(f"{msg}\n{h.dump_logs(fed.procs)}")


# The deployment preset (README step 6), shrunk to run in minutes.
PRESET = "simulations/configs/deploy.yaml"
TINY_OVERRIDES = [
    "federation.rounds=2", "teacher.weights=random",
    "teacher.arch=vit_tiny_patch16_224", "teacher.image_size=32",
    "student.arch=fedkd_cnn_tiny", "data.image_size=28",
]


@pytest.mark.slow
def test_real_app_two_rounds_over_tls(fed, tmp_path):
    app = h.copy_real_app(tmp_path)
    out = tmp_path / "run"
    overrides = ";".join([*TINY_OVERRIDES, f"run.out_dir={out}"])
    t0 = time.monotonic()
    run_id = fed.run(app, f'config-file="{PRESET}" overrides="{overrides}"')
    try:
        status = fed.wait_run(run_id, RUN_TIMEOUT)
    except TimeoutError as err:
        _fail_with_logs(fed, str(err))
    wall = time.monotonic() - t0
    if status["status"] != "finished:completed":
        _fail_with_logs(fed, f"run ended {status}")
    ckpt = out / "checkpoints"
    assert (ckpt / "round-0002.pt").is_file(), sorted(p.name for p in ckpt.iterdir())
    assert (ckpt / "latest.pt").is_file()
    rows = [json.loads(line) for line in
            (out / "history.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == [1, 2]
    # eval_in_train: every round keeps its per-site evaluation
    assert all(set(r["sites"]) == set(SITES) for r in rows), rows
    assert all("acc" in r["eval"] for r in rows), rows
    card = json.loads((out / "final" / "model_card.json").read_text())
    assert card["data"]["partition"] is None
    assert card["model"]["classes"] == ["normal", "pneumonia"]
    assert not card["shared_with_server"]["class_counts"]
    # hospital-a's warm worker handled its messages (handshake, rounds,
    # calibration); hospital-b's fresh ClientApp processes gave the same kind
    # of replies
    served = (fed.root / "worker-hospital-a.log").read_text()
    assert served.count("train handled") == 2, served[-2000:]
    assert "query handled" in served
    # and its SuperNode ran Flower's with the 0.2 s idle poll (deploy/supernode.py)
    node_log = (fed.root / "supernode-hospital-a.log").read_text()
    assert "SuperNode idle poll 0.2 s" in node_log, node_log[-2000:]
    # progress where operators look
    shown = fed.flwr("log", str(run_id), "fedkd", "--show", timeout=60)
    assert "round 2/2" in shown.stdout + shown.stderr, shown.stdout[-2000:]
    print(f"real app: 2 rounds, serverapp {status['elapsed']:.1f}s, wall "
          f"{wall:.1f}s, {status['network-traffic']['total-bytes']} B; "
          f"history rows: {len(rows)}; seconds per round: "
          f"{[round(float(r.get('seconds', 0)), 1) for r in rows]}")


def _run_to_end(fed, tmp_path, name: str, extra: list[str]) -> Path:
    app = h.copy_real_app(tmp_path / name)
    out = tmp_path / name / "run"
    overrides = ";".join([*TINY_OVERRIDES, *extra, f"run.out_dir={out}"])
    run_id = fed.run(app, f'config-file="{PRESET}" overrides="{overrides}"')
    try:
        status = fed.wait_run(run_id, RUN_TIMEOUT)
    except TimeoutError as err:
        _fail_with_logs(fed, str(err))
    if status["status"] != "finished:completed":
        _fail_with_logs(fed, f"{name} run ended {status}")
    return out


# measured 2026-12-01 (float64 updates, Q = 2^30): 1.5e-8 after round 1
# (one float32 ULP), 3.5e-4 after round 3: SGD carries a 1-ULP difference on,
# as it does any (tests/server/test_secagg.py compares with a 1-ULP nudge of
# plain FedAvg); docs/security.md
ROUND1_ATOL, ROUND3_ATOL = 1e-6, 2e-3


@pytest.mark.slow
def test_secure_aggregation_over_tls_gives_fedavgs_weights(fed, tmp_path):
    """3 rounds through Flower's SecAgg+ equal 3 plain FedAvg rounds (quantisation),
    and the closed-form head from the securely summed statistics equals the one
    from the statistics sent in the clear."""
    from server import checkpoint

    # the head's statistics in the clear (plain) need the class counts shared
    base = ["federation.rounds=3", "teacher.head=closed_form",
            "privacy.share_class_counts=true",
            "calibration.temperature=false", "calibration.ood=none"]
    plain = _run_to_end(fed, tmp_path, "plain", base)
    secure = _run_to_end(fed, tmp_path, "secure",
                         [*base, "privacy.secure_aggregation=true"])

    # round 1 starts from the same model: its aggregates differ by the
    # quantisation alone (2 sites: Q = 2^30 levels over +-8, a step of
    # 1.5e-8); rounds 2-3 train from models that differ by that much, and SGD
    # carries the difference on (as it carries any 1-ULP change)
    for rnd, atol in (("round-0001.pt", ROUND1_ATOL), ("latest.pt", ROUND3_ATOL)):
        a = checkpoint.load_checkpoint(plain / "checkpoints" / rnd)["arrays"]
        b = checkpoint.load_checkpoint(secure / "checkpoints" / rnd)["arrays"]
        worst = max(float(np.abs(b[k] - v).max()) for k, v in a.items()
                    if v.dtype.kind == "f" and not k.startswith("head."))
        print(f"SecAgg+ vs plain FedAvg, {rnd}: largest difference {worst:.2e}")
        assert worst <= atol, (rnd, worst)
        for key in ("head.weight", "head.bias"):  # solved once, from the sums
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)
    card = json.loads((secure / "final" / "model_card.json").read_text())
    assert card["shared_with_server"]["secure_aggregation"] is True
    rows = [json.loads(line) for line in
            (secure / "history.jsonl").read_text().splitlines() if line.strip()]
    assert [r["failed"] for r in rows] == [[], [], []]


def test_unregistered_supernode_is_refused(fed, tmp_path):
    data = tmp_path / "x.npz"
    data.write_bytes(b"not read")  # the node never gets to run the ClientApp
    proc = fed.start_supernode("intruder", f"npz:{data}", max_retries=1)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        _fail_with_logs(fed, "unregistered SuperNode kept running")
    node_log = fed.procs.log("supernode-intruder")
    assert rc != 0
    assert "Failed to activate SuperNode" in node_log, node_log
    assert "Receiving" not in node_log  # it never pulled a message
    assert "No SuperNode found with the given public key" in fed.procs.log(
        "superlink")
    assert len(fed.nodes()) == len(SITES)


def test_supernode_without_ca_cannot_connect(fed, tmp_path):
    # A registered key, but the node does not trust the federation CA.
    credentials.create_supernode_keys(fed.creds, "no-ca")
    fed.register("no-ca")
    data = tmp_path / "x.npz"
    data.write_bytes(b"not read")
    proc = fed.start_supernode("no-ca", f"npz:{data}", ca=False, max_retries=1)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        _fail_with_logs(fed, "SuperNode without CA kept running")
    node_log = fed.procs.log("supernode-no-ca")
    assert rc != 0
    assert "CERTIFICATE_VERIFY_FAILED" in node_log, node_log
    statuses = {n["node-id"]: n["status"] for n in fed.nodes()}
    assert sum(s == "online" for s in statuses.values()) == len(SITES)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_launcher_refuses_insecure_superlink(tmp_path):
    port = h.free_port()
    res = subprocess.run(
        [sys.executable, "-m", "deploy.launch", "superlink", "--state",
         str(tmp_path), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "--i-understand-this-is-insecure" in res.stderr
    assert not _port_open(port)


def test_flower_refuses_node_auth_without_tls(tmp_path):
    """Flower itself: --enable-supernode-auth with --insecure does not start."""
    port = h.free_port()
    env = h.launch.launch_env(tmp_path / "home")
    res = subprocess.run(
        [str(h.BIN / "flower-superlink"), "--insecure", "--enable-supernode-auth",
         "--port", str(port), "--database", str(tmp_path / "s.db")],
        env=env, capture_output=True, text=True, timeout=60,
        start_new_session=True)
    assert res.returncode != 0
    assert "requires encrypted TLS" in res.stdout + res.stderr
