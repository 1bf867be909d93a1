"""Leakage audit: a loss-threshold membership-inference attack on the final student.

    python -m benchmarks.mia [--quick] [--noise 0.1 1.0] [--rounds 20] [--epochs 2]
                             [--dp-sgd-epsilon 8 1] [--dp-sgd-clip 1.0]

Three federations on the shared PneumoniaMNIST file (4 sites, 28 px, plain
supervised FedAvg: `distill.alpha=1`, so no teacher is needed offline): DP off,
and site-level DP on at two noise multipliers with the same clipping norm;
`--dp-sgd-epsilon` adds one federation per target epsilon with per-patient
DP-SGD at the sites (`privacy.dp_sgd`), its noise multiplier chosen by Opacus
so that every site spends at most that epsilon over the whole run. Each final
student is then attacked as Yeom et al. (CSF 2018) do: score every image by
minus its cross-entropy loss under the model; members are the sites' training
images, non-members the held-out global test split that no site trained on
(members are subsampled to the same count). Reported per setting: the attack's
ROC AUC (0.5 = no leakage), its TPR at 1% FPR, the model's global test ACC
(the utility paid) and the (epsilon, delta) from `server.privacy`: site-level
and per-patient (the worst site's), each where it is on.

This is a measurement of one simple attack, not a privacy proof: a stronger
attack (shadow models, LiRA) can only do better.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from benchmarks._util import SHARED_NPZ, merge, parser, quick_overrides, table
from common.config import ExperimentConfig, load_config
from common.data.experiment import dataset_for  # the sites' own decoding
from common.data.sites import partition_sites
from common.data.views import to_student_tensor
from common.dp_sgd import noise_for_epsilon, planned_steps, sample_rate
from common.model_file import load_model
from server import history
from simulations.run import DEFAULT_CONFIG
from simulations.run import main as run_main


def _train(name: str, over: list[str], work: Path) -> Path:
    out = work / f"mia-{name}"
    shutil.rmtree(out, ignore_errors=True)
    args = [*over, f"run.out_dir={out}", f"run.name=mia-{name}"]
    assert run_main([x for a in args for x in ("--set", a)]) == 0, name
    return out


@torch.inference_mode()
def _losses(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, size: int
) -> np.ndarray:
    x, y = to_student_tensor(images, size), torch.from_numpy(labels).long()
    out = [
        F.cross_entropy(model(x[i : i + 256]), y[i : i + 256], reduction="none")
        for i in range(0, len(y), 256)
    ]
    return torch.cat(out).numpy()


def member_sets(cfg: ExperimentConfig, seed: int = 0):
    """(member images, labels), (non-member images, labels), equal counts."""
    ds = dataset_for(cfg)
    sites = partition_sites(ds, cfg.partition, cfg.train.seed)
    m_x = np.concatenate([s.train.images for s in sites])
    m_y = np.concatenate([s.train.labels for s in sites])
    n_x, n_y = ds.test.images, ds.test.labels
    n = min(len(m_y), len(n_y))
    rng = np.random.default_rng(seed)
    mi, ni = rng.permutation(len(m_y))[:n], rng.permutation(len(n_y))[:n]
    return (m_x[mi], m_y[mi]), (n_x[ni], n_y[ni])


def attack(run_dir: Path) -> dict:
    """Loss-threshold attack on the run's final student; AUC and TPR at 1% FPR."""
    cfg = load_config(run_dir / "config.yaml")
    model, meta = load_model(run_dir)
    (m_x, m_y), (n_x, n_y) = member_sets(cfg)
    loss_m = _losses(model, m_x, m_y, meta.image_size)
    loss_n = _losses(model, n_x, n_y, meta.image_size)
    member = np.r_[np.ones(len(loss_m)), np.zeros(len(loss_n))]
    score = -np.r_[loss_m, loss_n]  # lower loss -> more likely a member
    fpr, tpr, _ = roc_curve(member, score)
    rows = history.read_rows(run_dir / "history.jsonl")
    priv = rows[-1].get("privacy") or {}
    patient = rows[-1].get("privacy_per_patient") or {}
    return {
        "auc": float(roc_auc_score(member, score)),
        "tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
        "members": len(loss_m),
        "mean_loss_members": float(loss_m.mean()),
        "mean_loss_nonmembers": float(loss_n.mean()),
        "global_acc": rows[-1]["global"].get("acc"),
        "epsilon": priv.get("epsilon"),
        "delta": priv.get("delta"),
        # per-patient DP-SGD: the worst site's epsilon at its own delta
        "epsilon_per_patient": patient.get("epsilon"),
        "delta_per_patient": patient.get("delta"),
        "noise_multiplier_per_patient": patient.get("noise_multiplier"),
    }


def dp_sgd_noise(over: list[str], target_epsilon: float) -> float:
    """The DP-SGD noise multiplier keeping every site at or below `target_epsilon`.

    Each site's epsilon depends on its size N (rate q = batch / N, steps =
    rounds x epochs x ceil(N / batch)); the largest multiplier any site needs
    is used at all of them.
    """
    cfg = load_config(DEFAULT_CONFIG, [*over, "privacy.dp_sgd=true"])
    t, p = cfg.train, cfg.privacy
    need = []
    for site in partition_sites(dataset_for(cfg), cfg.partition, cfg.train.seed):
        n = int(site.labelled.sum())  # supervised: the labelled images train
        steps = cfg.federation.rounds * planned_steps(
            n, t.batch_size, t.local_epochs, t.local_steps
        )
        q = sample_rate(n, t.batch_size)
        need.append(
            noise_for_epsilon(
                target_epsilon, p.dp_sgd_delta, q, steps, p.dp_sgd_accountant
            )
        )
    return max(need)


def _overrides(quick: bool, work: Path, rounds: int, epochs: int) -> list[str]:
    """The settings every federation of the audit shares."""
    if quick:
        base = quick_overrides(work)
    else:
        base = [
            f"data.source=npz:{SHARED_NPZ}",
            "data.image_size=28",
            "teacher.image_size=28",
            "student.arch=fedkd_cnn_small",
        ]
    return [
        *base,
        "partition.sites=4",
        "partition.scheme=iid",
        "distill.alpha=1.0",
        "teacher.head=local",  # required with DP; the teacher is unused here
        "train.augment=false",  # augmentation would blur the loss gap measured
        f"train.local_epochs={epochs}",
        f"federation.rounds={rounds}",
        "run.engine=inprocess",
        f"data.cache_dir={work / 'cache'}",
    ]


def _eps(r: dict) -> str:
    """The privacy a setting reports, in words."""
    parts = []
    if r["delta"] is not None:
        e = "n/a" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        parts.append(f"site-level epsilon {e} at delta {r['delta']:g}")
    if r.get("delta_per_patient") is not None:
        e = r.get("epsilon_per_patient")
        e = "n/a" if e is None else f"{e:.3g}"
        parts.append(
            f"per-patient epsilon {e} at delta {r['delta_per_patient']:g} "
            f"(z {r['noise_multiplier_per_patient']:.3g})"
        )
    return ", ".join(parts) or "no DP"


def _print_results(results: dict[str, dict]) -> None:
    """One line per setting: attack AUC and TPR, utility, privacy."""
    print(
        table(
            [
                (
                    name,
                    f"AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr_at_1pct_fpr']:.3f}, global "
                    f"ACC {r['global_acc']:.3f}, {_eps(r)} ({r['members']} members vs "
                    "as many held out)",
                )
                for name, r in results.items()
            ]
        )
    )


def run(
    quick: bool,
    out,
    work,
    noise=(0.1, 1.0),
    rounds=None,
    epochs=None,
    clip: float = 1.0,
    dp_sgd_epsilons=(),
    dp_sgd_clip: float = 1.0,
) -> dict:
    """Train DP off / DP at two noise levels (and per-patient DP-SGD at each
    target epsilon), attack each; merge mia_* into `out`."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rounds = rounds or (2 if quick else 20)
    epochs = epochs or (1 if quick else 2)
    over = _overrides(quick, work, rounds, epochs)
    settings: dict[str, list[str]] = {"dp_off": []}
    for z in noise:
        settings[f"dp_z{z:g}"] = [
            "privacy.dp=true",
            f"privacy.noise_multiplier={z}",
            f"privacy.clipping_norm={clip}",
        ]
    targets: dict[str, Any] = {}
    for eps in dp_sgd_epsilons:
        z = dp_sgd_noise(over, eps)
        targets[f"dp_sgd_eps{eps:g}"] = {"target_epsilon": eps, "noise_multiplier": z}
        settings[f"dp_sgd_eps{eps:g}"] = [
            "privacy.dp_sgd=true",
            f"privacy.dp_sgd_noise_multiplier={z}",
            f"privacy.dp_sgd_max_grad_norm={dp_sgd_clip}",
        ]
    results = {
        name: attack(_train(name, [*over, *extra], work))
        for name, extra in settings.items()
    }
    keys = {
        f"mia_auc_{k.replace('.', 'p')}": round(v["auc"], 4) for k, v in results.items()
    }
    detail = {
        "settings": results,
        "rounds": rounds,
        "local_epochs": epochs,
        "clipping_norm": clip,
        "noise_multipliers": list(noise),
        "dp_sgd": {"clip": dp_sgd_clip, "targets": targets},
        "overrides": over,
        "quick": quick,
    }
    merge(out, "mia", keys, detail)
    _print_results(results)
    return keys


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument(
        "--noise",
        type=float,
        nargs="*",
        default=(0.1, 1.0),
        metavar="Z",
        help="site-level DP noise multipliers (none: no site-level DP runs)",
    )
    p.add_argument("--clip", type=float, default=1.0, help="DP clipping norm")
    p.add_argument(
        "--dp-sgd-epsilon",
        type=float,
        nargs="*",
        default=(),
        metavar="EPS",
        help="per-patient DP-SGD runs, one per target epsilon per site",
    )
    p.add_argument(
        "--dp-sgd-clip", type=float, default=1.0, help="DP-SGD per-image clip norm"
    )
    p.add_argument("--rounds", type=int, help="rounds (default 20; quick 2)")
    p.add_argument("--epochs", type=int, help="local epochs (default 2; quick 1)")
    args = p.parse_args()
    run(
        args.quick,
        args.out,
        args.work,
        tuple(args.noise),
        args.rounds,
        args.epochs,
        args.clip,
        tuple(args.dp_sgd_epsilon),
        args.dp_sgd_clip,
    )
