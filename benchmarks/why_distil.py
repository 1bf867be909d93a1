"""Why distil: student vs teacher inference throughput and size, same inputs.

python -m benchmarks.why_distil [--quick]
"""

from __future__ import annotations

import time

import torch

from benchmarks._util import merge, parser, table
from common.config import TeacherConfig
from common.data.views import to_student_tensor
from common.models.student import count_params, create_student
from common.models.teacher import load_teacher


def _rate(fn, n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def _models(quick: bool) -> tuple[TeacherConfig, str, int]:
    """The teacher's config, and the student's arch and image side."""
    if quick:
        tcfg = TeacherConfig(
            arch="vit_tiny_patch16_224", weights="random", image_size=32
        )
        return tcfg, "fedkd_cnn_tiny", 28
    tcfg = TeacherConfig(
        arch="vit_small_patch14_dinov2.lvd142m", weights="random", image_size=112
    )
    return tcfg, "fedkd_cnn_small", 64


def _test_images(quick: bool, work, image_size: int, n: int):
    """Up to n test images at the teacher's side."""
    from common.data.sources import load_dataset

    # Quick mode reads the small chest X-ray npz (offline); the full run Br35H.
    source = "br35h"
    if quick:
        from benchmarks._util import quick_overrides

        source = quick_overrides(work)[0].split("=", 1)[1]
    ds = load_dataset(source, image_size, work / "cache")
    return ds.test.images[:n]


def _print_rates(tcfg: TeacherConfig, detail: dict, keys: dict) -> None:
    """Throughput and size of both models, and the speed-up."""
    print(
        table(
            [
                (
                    "teacher",
                    f"{tcfg.arch} @ {tcfg.image_size}px: "
                    f"{detail['teacher_img_per_s']:.0f} img/s, "
                    f"{detail['teacher_params'] / 1e6:.1f} M params",
                ),
                (
                    "student",
                    f"{detail['student']} @ {detail['student_px']}px: "
                    f"{detail['student_img_per_s']:.0f} img/s, "
                    f"{detail['student_params'] / 1e6:.2f} M params",
                ),
                ("speed-up", keys["student_vs_teacher_speedup"]),
            ]
        )
    )


def run(quick: bool, out, work) -> dict:
    """Measure; merge student_vs_teacher_speedup into `out`."""
    tcfg, s_arch, s_size = _models(quick)
    images = _test_images(quick, work, tcfg.image_size, 64 if quick else 256)
    n = len(images)
    teacher = load_teacher(tcfg)
    print(f"teacher {tcfg.arch}: RANDOM-INIT weights (timing only)", flush=True)
    student = create_student(s_arch, 2, 1).eval()

    def student_pass() -> None:
        with torch.inference_mode():
            x = to_student_tensor(images, s_size)
            for i in range(0, n, 64):
                student(x[i : i + 64])

    t_rate = _rate(lambda: teacher.features(images, 64), n, 1 if quick else 2)
    s_rate = _rate(student_pass, n)
    keys = {"student_vs_teacher_speedup": round(s_rate / t_rate, 1)}
    detail = {
        "teacher": tcfg.arch,
        "teacher_px": tcfg.image_size,
        "teacher_img_per_s": t_rate,
        "teacher_params": count_params(teacher.model),
        "student": s_arch,
        "student_px": s_size,
        "student_img_per_s": s_rate,
        "student_params": count_params(student),
        "images": n,
        "includes_preprocessing": True,
    }
    merge(out, "why_distil", keys, detail)
    _print_rates(tcfg, detail, keys)
    return keys


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    run(args.quick, args.out, args.work)
