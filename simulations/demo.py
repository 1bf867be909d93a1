"""`make demo`: the default method beside FedAvg on four Br35H hospitals.

    python -m simulations.demo [--teacher proxy|hub|file:<path>] [--out DIR]
                               [--set section.key=value ...]

Offline (`proxy`, the default) the teacher is a resnet18 trained on the seed's
public pool, which no site receives, and every output names it PROXY. `hub`
and `file:` load the real DINOv2 ViT-S/14 at 112 px. Both runs go through the
harness, so an interrupted demo resumes and the report plots the two curves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from common.config import load_config
from simulations import harness

EXPERIMENT = "simulations/experiments/demo.yaml"
DINOV2 = "vit_small_patch14_dinov2.lvd142m"


def teacher_overrides(teacher: str) -> list[str]:
    """The --set items that replace the proxy with a real teacher (none for proxy)."""
    if teacher == "proxy":
        return []
    if teacher != "hub" and not teacher.startswith("file:"):
        raise SystemExit(
            f"error: --teacher {teacher!r}: use proxy, hub or file:<path>"
        )
    return [f"teacher.weights={teacher}", f"teacher.arch={DINOV2}",
            "teacher.image_size=112"]


REFERENCE = "pooled"  # the fair pooled reference: the same sites' images, pooled


def _reference_cache(out: Path, sets: list[str]) -> tuple[Path, Path, str]:
    """(the demo's pooled run folder, its cached copy, the cache key).

    The key hashes the pooled run's resolved config without its folder and
    name, so a cached run is reused only for exactly the same settings.
    """
    exp = harness.load_experiment(EXPERIMENT)
    extra = dict(s.split("=", 1) for s in sets)
    desc, overrides = next(
        (d, o) for d, o in harness._runs(exp, out, extra, harness.proxies(exp, extra))
        if d["method"] == REFERENCE
    )
    cfg = load_config(None, overrides).to_dict()
    cfg["run"].pop("out_dir")
    cfg["run"].pop("name")
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(load_config(None, overrides).data.cache_dir).expanduser()
    return Path(desc["run_dir"]), cache / "reference" / key, key


def _reuse_reference(run_dir: Path, cached: Path) -> bool:
    """Copy a finished cached pooled run into the demo, so the harness skips it."""
    if not (cached / "final" / "model_card.json").is_file() or run_dir.exists():
        return False
    shutil.copytree(cached, run_dir)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the demo comparison and print where the model and the plot are."""
    p = argparse.ArgumentParser(prog="python -m simulations.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="proxy")
    p.add_argument("--out", default=f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    out = Path(args.out)
    sets = teacher_overrides(args.teacher) + args.overrides
    t0 = time.perf_counter()
    ref_dir, cached, key = _reference_cache(out, sets)
    if _reuse_reference(ref_dir, cached):
        print(f"fair pooled reference reused from {cached} (same settings, key {key})")
    code = harness.main(["--experiment", EXPERIMENT, "--work", str(out),
                         "--out", str(out / "report"),
                         *[x for s in sets for x in ("--set", s)]])
    if code != 0:
        return code
    if not cached.exists():  # keep it for the next demo
        shutil.copytree(ref_dir, cached)
    results = json.loads((out / "report" / "results.json").read_text())
    acc = {k: v["global_acc_lastk"][0] for k, v in results["summary"].items()}
    model = out / "demo" / "fedkd" / "seed-0" / "final"
    print(f"demo done in {time.perf_counter() - t0:.0f}s: global-test ACC (mean of "
          f"the last 5 rounds) fedkd {acc.get('fedkd', float('nan')):.3f}, "
          f"fedavg {acc.get('fedavg', float('nan')):.3f}, fair pooled reference "
          f"{acc.get(REFERENCE, float('nan')):.3f}")
    print(f"model: {model}/model.pt (card: {model}/model_card.md)")
    print(f"plot:  {out / 'report' / 'accuracy_per_round.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
