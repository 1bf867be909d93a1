"""Bad input: one line that names the thing and the fix, a non-zero exit, no traceback.

Each case runs the real entry point (`simulations.run.main`). The table in
`docs/bad-inputs.md` is generated from CASES (run this module as a script:
`python -m tests.simulations.test_bad_inputs > docs/bad-inputs.md`) and a test
checks the two agree.
"""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simulations.run import main

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "bad-inputs.md"
FAST = ["run.engine=inprocess", "federation.rounds=1", "student.arch=fedkd_cnn_tiny",
        "teacher.arch=vit_tiny_patch16_224", "teacher.image_size=32",
        "teacher.weights=random", "data.image_size=28"]


def _npz(path: Path, **over) -> Path:
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 60), ("val", 10), ("test", 20)):
        data[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        data[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(-1, 1)
    data.update(over)
    data = {k: v for k, v in data.items() if v is not None}
    np.savez(path, **data)
    return path


def _folder(root: Path, empty_class: bool = False, bad_image: bool = False,
            odd: str | None = None, nested: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
        if empty_class and c == "malignant":
            continue
        for i in range(12):
            arr = rng.integers(0, 256, (20, 20), dtype=np.uint8)
            sub = root / c / (f"patient-{i % 3}" if nested and i >= 3 else "")
            sub.mkdir(exist_ok=True)
            Image.fromarray(arr).save(sub / f"{i}.png")
    if bad_image:
        (root / "benign" / "broken.png").write_bytes(b"\x89PNG not really")
    if odd == "rgba":  # half the pixels transparent
        rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
        rgba[:10, :, 3] = 0
        Image.fromarray(rgba, "RGBA").save(root / "benign" / "alpha.png")
    elif odd == "cmyk":
        Image.new("CMYK", (20, 20), (0, 200, 100, 30)).save(root / "benign" / "c.jpg")
    return root


def _truncated(path: Path) -> Path:
    good = _npz(path.with_name("full.npz"))
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _wrong_arch_weights(path: Path) -> Path:
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    return path


# (id, what, make(tmp) -> extra args, needle expected in the error line)
CASES = [
    ("config-unknown-key", "unknown config key",
     lambda t: ["--set", "train.lrr=0.1"], "unknown config key 'train.lrr'"),
    ("config-wrong-type", "wrong type",
     lambda t: ["--set", "train.lr=fast"], "'train.lr' must be float"),
    ("config-negative-rounds", "negative rounds",
     lambda t: ["--set", "federation.rounds=-1"], "'federation.rounds'"),
    ("config-alpha-range", "alpha outside [0, 1]",
     lambda t: ["--set", "distill.alpha=1.5"], "'distill.alpha' = 1.5 is out of range"),
    ("config-temperature", "temperature <= 0",
     lambda t: ["--set", "distill.temperature=0"], "'distill.temperature'"),
    ("config-infinite", "infinite timeout",
     lambda t: ["--set", "federation.round_timeout=.inf"],
     "'federation.round_timeout' is inf; give a finite number"),
    ("config-strategy", "unknown strategy",
     lambda t: ["--set", "federation.strategy=fedsgd"], "choose one of: fedavg"),
    ("config-closed-form-no-counts", "closed-form head with class counts private",
     lambda t: ["--set", "teacher.head=closed_form",
                "--set", "privacy.share_class_counts=false"],
     "privacy.share_class_counts=false forbids"),
    ("config-dp-sgd-soft-labels", "per-patient DP-SGD with the teacher's soft labels",
     lambda t: ["--set", "privacy.dp_sgd=true", "--set", "distill.alpha=0.5"],
     "privacy.dp_sgd=true does not compose with distill.alpha=0.5"),
    ("config-scaffold-dp", "SCAFFOLD with site-level DP",
     lambda t: ["--set", "federation.strategy=scaffold", "--set", "privacy.dp=true",
                "--set", "teacher.head=local"],
     "federation.strategy=scaffold does not compose with privacy.dp=true"),
    ("config-scaffold-dp-sgd", "SCAFFOLD with per-patient DP-SGD",
     lambda t: ["--set", "federation.strategy=scaffold",
                "--set", "privacy.dp_sgd=true", "--set", "distill.alpha=1"],
     "federation.strategy=scaffold does not compose with privacy.dp_sgd=true"),
    ("config-dp-sgd-no-noise", "DP-SGD noise multiplier 0",
     lambda t: ["--set", "privacy.dp_sgd_noise_multiplier=0"],
     "'privacy.dp_sgd_noise_multiplier' = 0.0 is out of range"),
    ("config-sites-gt-samples", "more sites than samples",
     lambda t: ["--set", f"data.source=npz:{_npz(t / 'd.npz')}",
                "--set", "partition.sites=80", "--set", "partition.scheme=iid"],
     "sites"),
    ("config-missing-file", "missing config file",
     lambda t: ["--config", str(t / "nope.yaml")], "config file not found"),
    ("config-bad-yaml", "config file that is not YAML",
     lambda t: ["--config", str(_text(t / "bad.yaml", "data: [unclosed\n"))],
     "not valid YAML"),
    ("data-bad-source", "unknown data source",
     lambda t: ["--set", "data.source=imagenet"], "'data.source'"),
    ("data-missing-npz", "missing npz file",
     lambda t: ["--set", f"data.source=npz:{t / 'absent.npz'}"], "absent.npz"),
    ("data-truncated-npz", "truncated npz",
     lambda t: ["--set", f"data.source=npz:{_truncated(t / 'cut.npz')}"], "cut.npz"),
    ("data-wrong-keys", "npz without train_labels",
     lambda t: ["--set", f"data.source=npz:{_npz(t / 'k.npz', train_labels=None)}"],
     "train_labels"),
    ("data-wrong-shape", "images of the wrong shape",
     lambda t: ["--set", "data.source=npz:" + str(_npz(
         t / 's.npz', train_images=np.zeros((60, 28), np.uint8)))], "train_images"),
    ("data-label-range", "negative label",
     lambda t: ["--set", "data.source=npz:" + str(_npz(
         t / 'l.npz', train_labels=np.full((60, 1), -1, np.int64)))], "label"),
    ("data-count-mismatch", "fewer labels than images",
     lambda t: ["--set", "data.source=npz:" + str(_npz(
         t / 'c.npz', train_labels=np.zeros((59, 1), np.uint8)))], "train_labels"),
    ("data-empty-class-folder", "empty class folder",
     lambda t: ["--set", f"data.source=folder:{_folder(t / 'f', empty_class=True)}"],
     "malignant"),
    ("data-unreadable-image", "unreadable image in a folder",
     lambda t: ["--set", f"data.source=folder:{_folder(t / 'g', bad_image=True)}"],
     "broken.png"),
    ("data-missing-folder", "missing folder",
     lambda t: ["--set", f"data.source=folder:{t / 'nowhere'}"], "nowhere"),
    ("model-unknown-student", "unknown student arch",
     lambda t: ["--set", "student.arch=resnet_tiniest"], "resnet_tiniest"),
    ("model-unknown-teacher", "unknown teacher arch",
     lambda t: ["--set", "teacher.arch=vit_gigantic_patch99"], "vit_gigantic_patch99"),
    ("model-patch-multiple", "teacher image size not a multiple of the patch",
     lambda t: ["--set", "teacher.image_size=30"], "teacher.image_size"),
    ("model-wrong-arch-weights", "weights file of another architecture",
     lambda t: ["--set", f"teacher.weights=file:{_wrong_arch_weights(t / 'r18.pt')}"],
     "r18.pt"),
    ("model-missing-weights", "missing weights file",
     lambda t: ["--set", f"teacher.weights=file:{t / 'gone.pth'}"], "gone.pth"),
    ("model-dp-sgd-batchnorm", "per-patient DP-SGD with a BatchNorm student",
     lambda t: ["--set", f"data.source=npz:{_npz(t / 'd.npz')}",
                "--set", "partition.scheme=iid", "--set", "privacy.dp_sgd=true",
                "--set", "distill.alpha=1", "--set", "student.arch=resnet18"],
     "student.arch=resnet18 cannot train with privacy.dp_sgd"),
    ("cli-bad-set", "bad --set syntax",
     lambda t: ["--set", "rounds"], "expected section.key=value"),
    ("cli-resume-nothing", "resume a folder without a checkpoint",
     lambda t: ["--resume", str(_mkdir(t / "empty"))], "config.yaml"),
    ("cli-used-run-folder", "run folder already used",
     lambda t: ["--set", f"run.out_dir={_text(t / 'used' / 'x.txt', 'x').parent}"],
     "not empty"),
    ("config-duplicate-key", "experiment YAML with two `data:` blocks",
     lambda t: ["--config", str(_text(t / "dup.yaml", DUPLICATE_YAML))],
     "duplicate key 'data' at line 5 (first at line 1)"),
    ("config-duplicate-nested-key", "a key repeated inside a block",
     lambda t: ["--config", str(_text(t / "dup2.yaml",
                                      "train:\n  lr: 0.1\n  lr: 0.2\n"))],
     "duplicate key 'lr' at line 3"),
    ("cli-resume-other-data", "`--resume RUN --set data.source=<other data>`",
     lambda t: ["--resume", str(_stored_run(t)),
                "--set", f"data.source=npz:{_npz(t / 'other.npz')}"],
     "a resume must not change its data, model or method"),
    ("cli-resume-other-method", "`--resume RUN --set federation.strategy=fedprox`",
     lambda t: ["--resume", str(_stored_run(t)),
                "--set", "federation.strategy=fedprox"],
     "federation.strategy='fedprox'"),
    ("cli-config-with-resume", "`--config other.yaml --resume RUN`",
     lambda t: ["--config", str(_text(t / "other.yaml", "train:\n  lr: 0.5\n")),
                "--resume", str(_stored_run(t))],
     "cannot be used with --resume"),
    ("cli-resume-finished", "`--resume` of a finished run",
     lambda t: ["--resume", str(_stored_run(t, finished=True))],
     "holds a finished run"),
    ("data-transparent-image", "RGBA PNG with transparent pixels among grayscale",
     lambda t: ["--set", f"data.source=folder:{_folder(t / 'a', odd='rgba')}"],
     "transparent pixel"),
    ("data-npz-empty-classes", "npz with generic names whose labels run to 7",
     lambda t: ["--set", "data.source=npz:" + str(_npz(t / 'mydata.npz', **{
         f"{s}_labels": (np.arange(n) % 2 * 7).astype(np.uint8)
         for s, n in (("train", 60), ("val", 10), ("test", 20))}))],
     "class id(s) [1, 2, 3, 4, 5, 6] have no image in any split"),
]

DUPLICATE_YAML = """data:
  source: br35h
train:
  lr: 0.01
data:
  image_size: 28
"""


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _base_sets(tmp: Path) -> list[str]:
    """The overrides every case runs with (fast settings, paths under tmp)."""
    return [f"run.out_dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}",
            f"teacher.cache_dir={tmp / 'tcache'}", *FAST]


def _stored_run(tmp: Path, finished: bool = False) -> Path:
    """A run folder as `simulations.run` leaves it: config.yaml of the base settings."""
    from common.config import load_config

    run = tmp / "stored"
    cfg = load_config(REPO / "simulations/configs/default.yaml", _base_sets(tmp))
    cfg.run.out_dir = str(run)
    _text(run / "config.yaml", cfg.to_yaml())
    _text(run / "checkpoints" / "latest.pt", "")
    if finished:
        _text(run / "final" / "model_card.json", "{}")
    return run


def run_case(make, tmp: Path, debug: bool = False) -> tuple[int, str, str]:
    """Run one case through the entry point; return (exit code, stdout, stderr)."""
    base = [x for o in _base_sets(tmp) for x in ("--set", o)]
    argv = base + make(tmp) + (["--debug"] if debug else [])
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


# -- model files, through `python -m client.predict` and `python -m server.export`


def _model(tmp: Path, edit: str | None = None) -> Path:
    """A run folder with final/model.pt, optionally damaged as `edit` says."""
    from common.model_file import content_hash
    from tests.client.test_predict import write_student

    run = write_student(tmp / "model-run", classes=("normal", "tumour"))
    path = run / "final" / "model.pt"
    payload = torch.load(path, weights_only=True)
    name = max(payload["state_dict"], key=lambda k: payload["state_dict"][k].numel())
    if edit == "flip":
        raw = payload["state_dict"][name].numpy().tobytes()
        data = bytearray(path.read_bytes())
        data[bytes(data).find(raw[:64]) + 40] ^= 0x01
        path.write_bytes(bytes(data))
        return run
    if edit == "classes":
        payload["classes"] = ["tumour", "normal"]
    elif edit == "size":
        payload["preprocess"]["image_size"] = 64
    elif edit == "nan":
        payload["state_dict"][name] = torch.full_like(payload["state_dict"][name],
                                                      float("nan"))
        payload["sha256"] = content_hash(payload)  # a consistent file with NaNs
    torch.save(payload, path)
    return run


def _image(tmp: Path) -> Path:
    path = tmp / "scan.png"
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(path)
    return path


def _predict(tmp: Path, edit: str) -> list[str]:
    return ["predict", "--model", str(_model(tmp, edit)), str(_image(tmp))]


def _export(tmp: Path, edit: str) -> list[str]:
    return ["export", str(_model(tmp, edit)), "--format", "torchscript"]


# (id, what, make(tmp) -> [tool, args...], needle)
TOOL_CASES = [
    ("model-flipped-byte", "predict with a model.pt that has one byte flipped",
     lambda t: _predict(t, "flip"), "fails its integrity check"),
    ("model-edited-classes", "predict with a model.pt whose class names were swapped",
     lambda t: _predict(t, "classes"), "fails its integrity check"),
    ("model-edited-size", "export a model.pt whose image size was edited",
     lambda t: _export(t, "size"), "fails its integrity check"),
    ("model-nan-weights", "predict with a model.pt holding NaN weights",
     lambda t: _predict(t, "nan"), "hold NaN or inf"),
    ("model-nan-weights-export", "export a model.pt holding NaN weights",
     lambda t: _export(t, "nan"), "hold NaN or inf"),
]


def run_tool(make, tmp: Path) -> tuple[int, str, str]:
    """Run a predict/export case through its entry point: (exit, stdout, stderr)."""
    from client import predict
    from server import export

    tool, *argv = make(tmp)
    entry = {"predict": predict.main, "export": export.main}[tool]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = entry(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("case_id", "what", "make", "needle"), TOOL_CASES,
                         ids=[c[0] for c in TOOL_CASES])
def test_bad_model_file_gets_one_named_line(case_id, what, make, needle, tmp_path):
    code, out, err = run_tool(make, tmp_path)
    assert code == 2, f"{case_id}: exit {code}"
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], f"{case_id}: stderr was {err!r}"
    assert "Traceback" not in err and out == ""


# -- inputs that are accepted by a documented rule, and wire faults the server
# handles: each runs the loop's own code and returns the line it logs or records


def _nested(tmp: Path) -> str:
    from common.data.folder import list_class_folders
    from common.data.inputs import collect_inputs

    root = _folder(tmp / "n", nested=True)
    _, paths, _ = list_class_folders(root)
    meta = type("Meta", (), {"decode_size": 20, "pil_mode": "L"})()
    predicted = collect_inputs([root], meta).items
    return (f"training uses {len(paths)} of 24 images, predict "
            f"{len(predicted)} of 24 (18 are in patient-* sub-folders)")


def _logged(logger: str, action) -> str:
    """The first WARNING `action` makes `logger` emit."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        action()
    finally:
        log.removeHandler(handler)
    return f"warning: {records[0].getMessage()}" if records else "no warning"


def _mixed_colour(tmp: Path) -> str:
    from common.data.folder import load_folder

    root = _folder(tmp / "m", odd="cmyk")
    return _logged("common.data.folder",
                   lambda: load_folder(root, 20, tmp / "cache")).replace(
                       str(tmp), "<tmp>")


def _absent_in_train(tmp: Path) -> str:
    from common.data.medmnist import load_npz

    labels = (np.arange(60) % 2).astype(np.uint8)
    path = _npz(tmp / "mine.npz", train_labels=labels,
                test_labels=(np.arange(20) % 3).astype(np.uint8))
    return _logged("common.data.medmnist", lambda: load_npz(path, 28)).replace(
        str(tmp), "<tmp>")


def _strategy(*overrides: str):
    from common.config import load_config
    from server.strategy import build_strategy

    return build_strategy(load_config(None, ["partition.sites=4", *overrides]), 4)


def _eval_without_metrics(tmp: Path) -> str:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from common.config import load_config
    from server.screening import screen_evaluate
    from server.strategy import site_eval_means

    def reply(name, metrics, node):
        out = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                      message_type=MessageType.EVALUATE)
        content = {"site": ConfigRecord({"name": name})}
        if metrics:
            content["metrics"] = MetricRecord(metrics)
        return Message(RecordDict(content), reply_to=out)

    cfg = load_config(None, ["partition.sites=4"])
    rows, report = screen_evaluate([reply("site-0", {"acc": 0.5}, 1),
                                    reply("site-1", None, 2)], cfg, {})
    agg = site_eval_means(rows)
    return f"recorded: {report.rejected[0]}; acc from the others {agg['acc']}"


def _fp16_server_send(tmp: Path) -> str:
    from common.errors import MessageError
    from common.serialization import pack

    strat = _strategy("federation.transfer_dtype=float16")
    try:
        strat.configure_train(1, pack({"student.w": np.array([7e4], np.float32)}),
                              None, None)
    except MessageError as err:
        return f"error: {err}"
    return "sent"


def _fp16_site_send(tmp: Path) -> str:
    from common.errors import MessageError
    from common.serialization import pack

    try:  # what client/app.py sends: pack(arrays, cfg.federation.transfer_dtype)
        pack({"student.w": np.array([-1e5, 1.0], np.float32)}, "float16")
    except MessageError as err:
        return f"error: {err}"
    return "sent"


def _int_buffer(tmp: Path) -> str:
    from common.serialization import load_into, pack
    from tests.server.test_strategy import _reply

    strat = _strategy("federation.transfer_dtype=float16",
                      "federation.norm_outlier_factor=0")
    steps = {"student.num_batches_tracked": np.array(70_001, np.int64)}
    strat._reference = pack(steps)
    agg, _ = strat.aggregate_train(1, [_reply(steps, 1, "a"), _reply(steps, 3, "b")])
    wire = pack({k: agg[k].numpy() for k in agg.keys()}, "float16")
    module = torch.nn.Module()
    module.register_buffer("num_batches_tracked", torch.tensor(0))
    load_into(module, wire, "student.")
    return (f"num_batches_tracked 70001 travels as "
            f"{wire['student.num_batches_tracked'].numpy().dtype} and loads as "
            f"{int(module.num_batches_tracked)}")


def _seeds(tmp: Path) -> str:
    from client.site import site_seed
    from common.config import load_config

    cfg = load_config(None)
    names = ("hospital-north", "hospital-south", "site-100", "site-1000")
    return "round-1 seeds " + ", ".join(f"{n}={site_seed(cfg, 1, n)}" for n in names)


# (id, input, run(tmp) -> the line logged or recorded, needle)
ACCEPTED = [
    ("data-nested-folders", "class folders with images in sub-sub-folders",
     _nested, "training uses 24 of 24 images, predict 24 of 24"),
    ("data-mixed-colour", "one CMYK JPEG among grayscale PNGs",
     _mixed_colour, "1 of 25 images are colour and are converted to L"),
    ("data-class-absent-in-train", "npz with a class only in its test split",
     _absent_in_train, "class id(s) [2] have no training images"),
    ("wire-evaluate-no-metrics", "evaluate reply without a MetricRecord",
     _eval_without_metrics, "site-1 (evaluate): malformed reply"),
    ("wire-fp16-server-send", "float16 wire, a global weight of 7e4 (server send)",
     _fp16_server_send, "outside the float16 range"),
    ("wire-fp16-site-send", "float16 wire, a site weight of -1e5 (site send)",
     _fp16_site_send, "outside the float16 range"),
    ("wire-int-buffer-fp16", "int64 buffer above 65504 on the float16 wire",
     _int_buffer, "travels as int64 and loads as 70001"),
    ("seeds-shared-prefix", "site names sharing their first 8 bytes",
     _seeds, "round-1 seeds"),
]


@pytest.mark.parametrize(("case_id", "what", "run", "needle"), ACCEPTED,
                         ids=[c[0] for c in ACCEPTED])
def test_accepted_input_follows_its_rule(case_id, what, run, needle, tmp_path):
    line = run(tmp_path)
    assert needle in line, f"{case_id}: {line!r}"


def test_shared_prefix_sites_get_different_seeds(tmp_path):
    seeds = [int(part.split("=")[1]) for part in _seeds(tmp_path)[14:].split(", ")]
    assert len(set(seeds)) == 4


@pytest.mark.parametrize(("case_id", "what", "make", "needle"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_gets_one_named_line(case_id, what, make, needle, tmp_path):
    code, _, err = run_case(make, tmp_path)
    assert code != 0, f"{case_id}: exit 0"
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"{case_id}: stderr was {err!r}"
    assert needle in lines[0], f"{case_id}: {lines[0]!r} lacks {needle!r}"
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a failed start left a run folder"


def test_too_many_sites_fail_before_the_engine_starts(tmp_path, monkeypatch):
    import simulations.engine

    def no_engine(*args, **kwargs):
        raise AssertionError("the Simulation Engine was started")

    monkeypatch.setattr(simulations.engine, "simulate", no_engine)
    make = dict((c[0], c[2]) for c in CASES)["config-sites-gt-samples"]
    code, _, err = run_case(lambda t: [*make(t), "--set", "run.engine=ray"], tmp_path)
    assert code == 2 and "partition.min_site_size" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - any FedKDError subclass
        run_case(lambda t: ["--set", "data.source=npz:/nope/x.npz"], tmp_path,
                 debug=True)


def test_doc_lists_every_case():
    text = DOC.read_text()
    rows = {ln.split("`")[1]: ln for ln in text.splitlines() if ln.startswith("| `")}
    for case_id, _, _, needle in CASES + TOOL_CASES + ACCEPTED:
        assert case_id in rows, case_id
        assert needle in rows[case_id].replace("\\|", "|"), case_id
    assert f"{len(CASES) + len(TOOL_CASES)} bad inputs" in text


def render_doc() -> str:
    """The markdown table of docs/bad-inputs.md, from real runs of every case."""
    import tempfile

    rows = ["# Bad inputs and the errors they get", "",
            "Every row is a test case in `tests/simulations/test_bad_inputs.py` (run "
            "through `python -m simulations.run`, or `client.predict` / "
            "`server.export` for model files): a one-line `error:` message that "
            "names the thing and the fix, a non-zero exit, no traceback (add "
            "`--debug` to see it). Regenerate with "
            "`python -m tests.simulations.test_bad_inputs > docs/bad-inputs.md`.", "",
            "| case | bad input | exit | error line (temporary paths shortened) |",
            "|---|---|---|---|"]
    cases = [(c, run_case) for c in CASES] + [(c, run_tool) for c in TOOL_CASES]
    for (case_id, what, make, _), runner in cases:
        with tempfile.TemporaryDirectory() as tmp:
            code, _, err = runner(make, Path(tmp))
            line = next((ln for ln in err.splitlines() if ln.startswith("error:")), err)
            line = line.replace(tmp, "<tmp>").replace("|", "\\|")
        rows.append(f"| `{case_id}` | {what} | {code} | {line} |")
    rows[4:4] = [f"{len(cases)} bad inputs: {len(CASES)} through "
                 "`python -m simulations.run`, "
                 f"{len(TOOL_CASES)} through `python -m client.predict` or "
                 "`python -m server.export` (the `model-*` rows with a model.pt).", ""]
    rows += ["", "## Accepted by a documented rule, or handled on the wire", "",
             "These inputs do not stop a run: each follows the rule in "
             "`common/data/folder.py`, `common/data/medmnist.py` or "
             "`common/serialization.py`, and the line is what the loop logs or "
             "records (test: `test_accepted_input_follows_its_rule`).", "",
             "| case | input | line logged or recorded |", "|---|---|---|"]
    for case_id, what, run, _ in ACCEPTED:
        with tempfile.TemporaryDirectory() as tmp:
            line = run(Path(tmp)).replace(tmp, "<tmp>").replace("|", "\\|")
        rows.append(f"| `{case_id}` | {what} | {line} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # as tests/conftest.py does
        if getattr(TaskIdentity, attr) is None:
            setattr(TaskIdentity, attr, 1)
    sys.stdout.write(render_doc())

