"""Small builders shared by tests: a tiny real-data npz and fast configs."""

from pathlib import Path

import numpy as np

from common.config import ExperimentConfig, load_config

TINY_TEACHER = [
    "teacher.arch=vit_tiny_patch16_224",
    "teacher.image_size=32",
    "teacher.weights=random",
    "teacher.batch_size=128",
]


def small_npz(
    src: Path, dst: Path, n_train: int = 240, n_test: int = 60, seed: int = 0
) -> Path:
    """A class-balanced subset of a MedMNIST-layout npz, written to `dst`."""
    rng = np.random.default_rng(seed)
    with np.load(src) as z:
        data = {k: z[k] for k in z.files}
    out = {}
    for split, n in (("train", n_train), ("val", n_test // 2), ("test", n_test)):
        labels = data[f"{split}_labels"].reshape(-1)
        idx = np.concatenate(
            [
                rng.permutation(np.flatnonzero(labels == c))[: n // 2]
                for c in np.unique(labels)
            ]
        )
        idx.sort()
        out[f"{split}_images"] = data[f"{split}_images"][idx]
        out[f"{split}_labels"] = data[f"{split}_labels"][idx]
    np.savez(dst, **out)
    return dst


def tiny_config(npz: Path, tmp: Path, *extra: str) -> ExperimentConfig:
    """A config that trains in seconds: tiny teacher and student, 28 px."""
    return load_config(
        None,
        [
            f"data.source=npz:{npz}",
            "data.image_size=28",
            f"data.cache_dir={tmp}/cache",
            *TINY_TEACHER,
            f"teacher.cache_dir={tmp}/teacher-cache",
            "student.arch=fedkd_cnn_tiny",
            "partition.sites=3",
            "partition.alpha=1.0",
            "partition.min_site_size=5",
            "federation.rounds=2",
            "federation.min_sites=2",
            "train.batch_size=32",
            "train.num_threads=1",
            f"run.out_dir={tmp}/run",
            *extra,
        ],
    )
