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


def _folder(root: Path, empty_class: bool = False, bad_image: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
        if empty_class and c == "malignant":
            continue
        for i in range(12):
            arr = rng.integers(0, 256, (20, 20), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    if bad_image:
        (root / "benign" / "broken.png").write_bytes(b"\x89PNG not really")
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
    ("cli-bad-set", "bad --set syntax",
     lambda t: ["--set", "rounds"], "expected section.key=value"),
    ("cli-resume-nothing", "resume a folder without a checkpoint",
     lambda t: ["--resume", str(_mkdir(t / "empty"))], "config.yaml"),
    ("cli-used-run-folder", "run folder already used",
     lambda t: ["--set", f"run.out_dir={_text(t / 'used' / 'x.txt', 'x').parent}"],
     "not empty"),
]


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_case(make, tmp: Path, debug: bool = False) -> tuple[int, str, str]:
    """Run one case through the entry point; return (exit code, stdout, stderr)."""
    base = ["--set", f"run.out_dir={tmp / 'run'}", "--set",
            f"data.cache_dir={tmp / 'cache'}", "--set",
            f"teacher.cache_dir={tmp / 'tcache'}"]
    for o in FAST:
        base += ["--set", o]
    argv = base + make(tmp) + (["--debug"] if debug else [])
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


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
    for case_id, _, _, needle in CASES:
        assert case_id in rows, case_id
        assert needle in rows[case_id].replace("\\|", "|"), case_id


def render_doc() -> str:
    """The markdown table of docs/bad-inputs.md, from real runs of every case."""
    import tempfile

    rows = ["# Bad inputs and the errors they get", "",
            "Every row is a test case in `tests/simulations/test_bad_inputs.py` (run "
            "through `python -m simulations.run`): a one-line `error:` message that "
            "names the thing and the fix, a non-zero exit, no traceback (add "
            "`--debug` to see it). Regenerate with "
            "`python -m tests.simulations.test_bad_inputs > docs/bad-inputs.md`.", "",
            "| case | bad input | exit | error line (temporary paths shortened) |",
            "|---|---|---|---|"]
    for case_id, what, make, _ in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            code, _, err = run_case(make, Path(tmp))
            line = next((ln for ln in err.splitlines() if ln.startswith("error:")), err)
            line = line.replace(tmp, "<tmp>").replace("|", "\\|")
        rows.append(f"| `{case_id}` | {what} | {code} | {line} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_doc())

