"""The hospital's GPU: teacher throughput and a federated round, GPU against CPU.

    python -m benchmarks.gpu [--quick]

Needs a CUDA device; without one it stops with one line. Records into
`benchmarks/results.json`:

- `gpu_teacher_img_s_vits14_224`, `gpu_teacher_img_s_vitb14_224`: frozen
  DINOv2 ViT-S/14 and ViT-B/14 (random weights, nothing downloads) turning
  uint8 224 px images into features (`FrozenTeacher.features`: upload,
  resize, normalise, forward, download), batch 64, fp32, after a warm-up;
- `gpu_round_s`, `cpu_round_s`, `gpu_round_speedup`: the median steady round
  of the in-process simulation (2 IID sites of the shared pneumonia file, the
  deployment preset, ViT-S/14 teacher at 112 px, 3 rounds) with
  `run.device=cuda` and with `run.device=cpu` (every CPU thread).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks._util import SHARED_NPZ, merge, parser, table

ARCHS = {
    "vits14": "vit_small_patch14_dinov2",
    "vitb14": "vit_base_patch14_dinov2",
}
PRESET = "simulations/configs/deploy.yaml"


def teacher_img_s(arch: str, device: str, images: int, batch: int = 64) -> float:
    """Images per second of FrozenTeacher.features at 224 px on `device`."""
    import numpy as np
    import torch

    from common.config import TeacherConfig
    from common.models.teacher import load_teacher

    teacher = load_teacher(TeacherConfig(arch=arch, weights="random", image_size=224))
    teacher = teacher.to(device)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 224, 224, 3), dtype=np.uint8)
    teacher.features(x[: batch * 2], batch_size=batch)  # warm-up (kernels, cudnn)
    torch.cuda.synchronize()
    t = time.perf_counter()
    teacher.features(x, batch_size=batch)  # ends with a copy to the host: synced
    return images / (time.perf_counter() - t)


def round_s(work: Path, device: str, rounds: int, quick: bool) -> list[float]:
    """Per-round seconds of the in-process simulation on `device`."""
    from server import history
    from simulations.run import main as run_main

    out = work / f"round-{device}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [
        f"data.source=npz:{SHARED_NPZ}",
        "data.image_size=28",
        f"data.cache_dir={work / 'data'}",
        # a separate cache per device: each run extracts its own features once
        f"teacher.cache_dir={work / ('teacher-' + device)}",
        "teacher.weights=random",
        "teacher.arch=vit_small_patch14_dinov2",
        f"teacher.image_size={56 if quick else 112}",
        "partition.sites=2",
        "partition.scheme=iid",
        "run.engine=inprocess",
        f"run.device={device}",
        f"federation.rounds={rounds}",
        f"run.out_dir={out}",
    ]
    args = ["--config", PRESET] + [x for s in sets for x in ("--set", s)]
    assert run_main(args) == 0
    return [r["seconds"] for r in history.read_rows(out / "history.jsonl")]


def run(quick: bool, out: Path, work: Path) -> dict:
    """Measure on the GPU and the CPU; merge the keys into `out` (not --quick)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device visible to torch; nothing run")
    if not SHARED_NPZ.is_file():
        raise SystemExit(f"benchmarks.gpu needs {SHARED_NPZ}; it is absent")
    work = Path(work).resolve() / "gpu-bench"
    work.mkdir(parents=True, exist_ok=True)
    images = 256 if quick else 2048
    keys: dict = {}
    detail: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "cuda": torch.version.cuda,
        "images": images,
        "load_start": round(os.getloadavg()[0], 2),
    }
    for short, arch in ARCHS.items():
        rate = teacher_img_s(arch, "cuda", images)
        keys[f"gpu_teacher_img_s_{short}_224"] = round(rate, 1)
    rounds = 2 if quick else 3
    steady = lambda xs: statistics.median(xs[1:] if len(xs) > 1 else xs)  # noqa: E731
    gpu = round_s(work, "cuda", rounds, quick)
    cpu = round_s(work, "cpu", rounds, quick)
    keys["gpu_round_s"] = round(steady(gpu), 2)
    keys["cpu_round_s"] = round(steady(cpu), 2)
    keys["gpu_round_speedup"] = round(steady(cpu) / steady(gpu), 2)
    detail.update(
        gpu_round_s=gpu,
        cpu_round_s=cpu,
        cpu_threads=torch.get_num_threads(),
        load_end=round(os.getloadavg()[0], 2),
        note="rounds: in-process engine, deployment preset, 2 IID sites of the "
        "shared pneumonia file, random ViT-S/14 teacher; steady = median of "
        "rounds after the first (which also fills the teacher cache)",
    )
    if not quick:
        merge(out, "gpu", keys, detail)
    print(table(list(keys.items())))
    return {**keys, "detail": detail}


def main() -> None:
    """Command-line entry."""
    args = parser(__doc__).parse_args()
    try:
        run(args.quick, args.out, args.work)
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
