"""The final student, saved with its preprocessing, and its model card (md + json)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from common.config import ExperimentConfig
from common.secure_sum import head_sums_secured

RANDOM_BANNER = (
    "WARNING: the teacher was RANDOM-INIT (teacher.weights=random). Its soft targets "
    "carry no knowledge; this run checks the pipeline only."
)
PROXY_BANNER = (
    "NOTE: the teacher is a PROXY (trained on a public pool no site received), "
    "not DINOv2."
)


def teacher_source(cfg: ExperimentConfig, site_infos: list[dict[str, Any]]) -> str:
    """hub | file | proxy | random | none, as the sites reported loading it."""
    reported = {str(s.get("teacher-weights", "none")) for s in site_infos}
    reported.discard("none")
    if len(reported) > 1:
        return "mixed:" + ",".join(sorted(reported))
    if reported:
        return reported.pop()
    if cfg.distill.alpha >= 1.0 and cfg.distill.feature_weight == 0:
        return "none"
    return cfg.teacher.weights.split(":", 1)[0]


def build_card(
    cfg: ExperimentConfig,
    *,
    classes: list[str],
    site_infos: list[dict],
    rounds_done: int,
    final_metrics: dict[str, Any],
    teacher: dict[str, Any],
    params: int,
    privacy: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    privacy_per_patient: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card as plain data (`privacy`, `privacy_per_patient`: the last
    history row's site-level and per-patient DP entries; `calibration`:
    server.calibration's report on the final model)."""
    return {
        "model": {
            "arch": cfg.student.arch,
            "parameters": params,
            "input": f"{cfg.data.image_size}px, channels from data",
            "classes": classes,
        },
        "method": {
            "strategy": cfg.federation.strategy,
            "distillation": {
                "alpha": cfg.distill.alpha,
                "temperature": cfg.distill.temperature,
                "feature_weight": cfg.distill.feature_weight,
                "unlabelled_weight": cfg.distill.unlabelled_weight,
            },
            "rounds": rounds_done,
            "local_epochs": cfg.train.local_epochs,
            "transfer_dtype": cfg.federation.transfer_dtype,
            "dp": _dp_entry(cfg, privacy),
            "dp_sgd": _dp_sgd_entry(cfg, privacy_per_patient),
        },
        "shared_with_server": _shared(cfg, site_infos, calibration),
        "teacher": teacher,
        "data": _data_entry(cfg, site_infos),
        "metrics": final_metrics,
        "calibration": calibration or {"skipped": "not run"},
        "intended_use": (
            "Research on federated knowledge distillation for medical image "
            "classification. NOT a medical device: not validated for diagnosis, "
            "triage or any clinical decision."
        ),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _data_entry(cfg: ExperimentConfig, site_infos: list[dict]) -> dict[str, Any]:
    """The data section: real sites in a deployment, the partition in simulation."""
    if site_infos and all(s.get("deployed") for s in site_infos):
        return {
            "source": "each site's own data (deployment)",
            "partition": None,
            "sites": site_infos,
        }
    return {
        "source": cfg.data.source,
        "partition": cfg.partition.scheme,
        "alpha": cfg.partition.alpha,
        "shift": cfg.partition.shift,
        "labelled_fraction": cfg.partition.labelled_fraction,
        "sites": site_infos,
    }


def _dp_entry(cfg: ExperimentConfig, privacy: dict[str, Any] | None) -> dict:
    """DP settings and the (epsilon, delta) spent, as server.privacy reported it."""
    entry = {
        "enabled": cfg.privacy.dp,
        "clipping_norm": cfg.privacy.clipping_norm,
        "noise_multiplier": cfg.privacy.noise_multiplier,
        "delta": cfg.privacy.delta if cfg.privacy.dp else None,
        "epsilon": None,
        "epsilon_note": "DP off" if not cfg.privacy.dp else "no round completed",
    }
    if cfg.privacy.dp and privacy:
        entry.update(privacy)
        entry["epsilon_note"] = privacy.get("note") or (
            "site-level, add/remove one site, RDP (dp-accounting); docs/security.md"
        )
    return entry


DP_SGD_COVERS = (
    "each training image's influence on the student updates its site sends "
    "(hence on every model the server builds from them): a curious server or "
    "anyone holding the model cannot tell with confidence beyond (epsilon, "
    "delta) whether one image was in a site's training set"
)
DP_SGD_DOES_NOT_COVER = (
    "a patient with several images (about k times epsilon for k images); the "
    "site's test part and everything sent outside the updates (scalar metrics, "
    "handshake sizes and class counts); the teacher, whose weights must not "
    "come from these patients; a site that leaks its own data"
)


def _dp_sgd_entry(cfg: ExperimentConfig, spent: dict[str, Any] | None) -> dict:
    """Per-patient DP-SGD settings and each site's epsilon, as the sites reported."""
    p = cfg.privacy
    if not p.dp_sgd:
        return {"enabled": False, "epsilon": None, "epsilon_note": "DP-SGD off"}
    entry = {
        "enabled": True,
        "level": "per patient (one training image), at each site",
        "noise_multiplier": p.dp_sgd_noise_multiplier,
        "max_grad_norm": p.dp_sgd_max_grad_norm,
        "delta": p.dp_sgd_delta,
        "epsilon": None,
        "epsilon_note": "no round completed",
        "covers": DP_SGD_COVERS,
        "does_not_cover": DP_SGD_DOES_NOT_COVER,
    }
    if spent:
        entry.update(spent)
        entry["epsilon_note"] = (
            "the worst site's, over all its DP-SGD steps of all rounds; "
            "docs/security.md"
        )
    return entry


def _shared(
    cfg: ExperimentConfig,
    site_infos: list[dict],
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What every site sent the server besides model updates and scalar metrics."""
    keys = sorted({k for s in site_infos for k in s})
    out = {
        "handshake_keys": keys,
        "class_counts": "class-counts" in keys,
        "per_round": "student update (and head/projection when federated), "
        "train/eval scalar metrics",
        "secure_aggregation": cfg.privacy.secure_aggregation,
    }
    if cfg.privacy.secure_aggregation:
        out["per_round"] = (
            "the student update masked by Flower's SecAgg+ (the server unmasks "
            "only the example-weighted mean of the sites' updates, never one "
            "site's), each site's training-image count and train/eval scalar "
            "metrics in the clear"
        )
    if head_sums_secured(cfg):
        out["teacher_head_statistics"] = (
            "once, after the handshake, masked by Flower's SecAgg+: the server "
            "unmasks only the sum over sites of the per-class counts, feature "
            "sums and Gram matrices of the labelled teacher features (the "
            "pooled class counts and moments, never one site's); each site's "
            "handshake adds teacher-feature-log2, a power of two above its "
            "largest teacher feature value, the sum's public scale"
        )
    elif cfg.teacher.head == "closed_form":
        out["teacher_head_statistics"] = (
            "once, in the handshake: per-class counts, per-class sums and Gram "
            "matrices of the labelled teacher features (closed-form head; they "
            "reveal each class's count, feature mean and feature covariance at "
            "the site, never an image or one image's features)"
        )
    if calibration and not calibration.get("skipped"):
        per_class = (calibration.get("ood") or {}).get("classwise", True)
        out["calibration_statistics"] = (
            "once, for the final model: the summed NLL over a fixed temperature "
            "grid and the calibration bins of the held-out test part; "
            + (
                "per-class counts and feature sums"
                if per_class
                else "the count and feature sum (class-agnostic)"
            )
            + " and the feature Gram matrix of the training images in the "
            "student's feature space; the histogram of the held-out images' "
            "out-of-distribution scores (docs/security.md)"
        )
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_markdown(card: dict[str, Any]) -> str:
    """Human-readable model card."""
    t = card["teacher"]
    lines = [
        f"# Model card: {card['model']['arch']} ({card['method']['strategy']})",
        "",
    ]
    if t.get("weights_source") == "random":
        lines += [f"> **{RANDOM_BANNER}**", ""]
    elif t.get("weights_source") == "proxy":
        lines += [f"> **{PROXY_BANNER}**", ""]
    lines += [
        "> **Not a medical device.** " + card["intended_use"],
        "",
        "## Teacher",
        f"- arch: `{t.get('arch')}`",
        f"- weights source: **{t.get('weights_source')}** (`{t.get('weights_spec')}`)",
        f"- head: {t.get('head')}",
        "",
        "## Method",
        f"- strategy: {card['method']['strategy']}, "
        f"rounds: {card['method']['rounds']}, "
        f"local epochs: {card['method']['local_epochs']}",
        f"- distillation: {card['method']['distillation']}",
        f"- transfer dtype: {card['method']['transfer_dtype']}",
        f"- site-level privacy (one hospital): {_dp_line(card['method']['dp'])}",
        f"- per-patient privacy (one training image): "
        f"{_dp_sgd_line(card['method'].get('dp_sgd') or {})}",
        f"- shared with the server: {_shared_line(card.get('shared_with_server'))}",
        "",
        "## Data",
        _data_line(card["data"]),
        f"- classes: {', '.join(card['model']['classes'])}",
        "",
        "| site | train | labelled | test |",
        "|---|---|---|---|",
    ]
    for s in card["data"]["sites"]:
        lines.append(
            f"| {s.get('name')} | {s.get('num-train')} | {s.get('num-labelled')} "
            f"| {s.get('num-test')} |"
        )
    lines += ["", "## Test metrics", "", "| metric | value |", "|---|---|"]
    for k, v in sorted(card["metrics"].items()):
        if not isinstance(v, dict):
            lines.append(f"| {k} | {_fmt(v)} |")
    per_site = card["metrics"].get("per_site", {})
    if per_site:
        lines += ["", "| site | acc | auc |", "|---|---|---|"]
        for name, m in sorted(per_site.items()):
            lines.append(
                f"| {name} | {_fmt(m.get('eval/acc', ''))} | "
                f"{_fmt(m.get('eval/auc', 'n/a'))} |"
            )
    lines += _calibration_lines(card.get("calibration") or {})
    lines += ["", f"Created {card['created']}.", ""]
    return "\n".join(lines)


def _pct(v: Any) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, float) else "n/a"


def _calibration_lines(c: dict[str, Any]) -> list[str]:
    """The card's calibration and out-of-distribution section."""
    lines = ["", "## Calibration and out-of-distribution check", ""]
    if c.get("skipped"):
        return lines + [
            f"- **not fitted**: {c['skipped']}. Probabilities are uncalibrated "
            "and `client.predict` checks no input."
        ]
    t = c.get("temperature")
    if t:
        lines.append(
            f"- temperature scaling: **T = {t['temperature']:.3f}** "
            f"(probabilities = softmax(logits / T)), fitted on {t['fitted_on']}, "
            f"{t['images']} images; mean NLL there {t['nll_before']:.4f} -> "
            f"{t['nll_after']:.4f}"
        )
    else:
        lines.append("- temperature scaling: **not fitted** (see the run's log)")
    if "ece_global_test_before" in c:
        lines.append(
            f"- ECE on the global test ({c.get('global_test_images')} images, 15 "
            f"bins): **{_fmt(c['ece_global_test_before'])} before, "
            f"{_fmt(c.get('ece_global_test_after', 'n/a'))} after** calibration"
        )
    if "ece_sites_before" in c:
        lines.append(
            f"- ECE on the sites' held-out parts (where T was fitted): "
            f"{_fmt(c['ece_sites_before'])} before, "
            f"{_fmt(c.get('ece_sites_after', 'n/a'))} after"
        )
    o = c.get("ood")
    if not o:
        return lines + ["- out-of-distribution check: **not fitted** (see the log)"]
    lines += [
        f"- out-of-distribution score: {o['score']}; reference: "
        f"{o['reference_images']} training images ({c.get('data', '')})",
        f"- threshold **{o['threshold']:.4g}**, chosen on {o['held_out']} held-out "
        f"images so that at most {_pct(o['false_alarm'])} of new "
        f"in-distribution images are flagged, with confidence "
        f"{o['confidence']:.2f}; flagged: **{_pct(o['held_out_flagged'])} of the "
        f"held-out images**"
        + (
            f", **{_pct(c['global_test_flagged'])} of the global test**"
            if "global_test_flagged" in c
            else ""
        ),
        f"- what it cannot catch: {o['cannot_catch']}",
    ]
    return lines


def _data_line(data: dict[str, Any]) -> str:
    if data.get("partition") is None:
        return (
            f"- source: {data['source']}: {len(data['sites'])} hospitals, each "
            "training on its own data (no partition)"
        )
    return (
        f"- source: `{data['source']}`; partition {data['partition']} "
        f"(alpha {data['alpha']}), shift {data['shift']}, "
        f"labelled fraction {data['labelled_fraction']}"
    )


def _dp_line(dp: dict[str, Any]) -> str:
    if not dp.get("enabled"):
        return "DP off"
    head = (
        f"DP on (clipping norm {dp['clipping_norm']:g}, noise multiplier "
        f"{dp['noise_multiplier']:g})"
    )
    if dp.get("epsilon") is None:
        return f"{head}; **epsilon not available**: {dp.get('epsilon_note')}"
    return (
        f"{head}; **(epsilon = {dp['epsilon']:.3g}, delta = {dp['delta']:g})** per "
        f"site over {dp.get('releases')} releases ({dp.get('neighbouring')}, "
        f"{dp.get('sampling')}, {dp.get('accountant')})"
    )


def _dp_sgd_line(dp: dict[str, Any]) -> str:
    if not dp.get("enabled"):
        return "DP-SGD off"
    head = (
        f"DP-SGD at each site (Opacus; per-image clipping {dp['max_grad_norm']:g}, "
        f"noise multiplier {dp['noise_multiplier']:g})"
    )
    if dp.get("epsilon") is None:
        return f"{head}; **epsilon not available**: {dp.get('epsilon_note')}"
    sites = ", ".join(
        f"{name} {v['epsilon']:.3g} ({v['steps']} steps)"
        for name, v in (dp.get("per_site") or {}).items()
    )
    return (
        f"{head}; **(epsilon = {dp['epsilon']:.3g}, delta = {dp['delta']:g})** at "
        f"the worst site [{sites}] ({dp.get('sampling')}; {dp.get('accountant')}). "
        f"Covers {dp['covers']}. Does not cover {dp['does_not_cover']}"
    )


def _shared_line(shared: dict[str, Any] | None) -> str:
    if not shared:
        return "n/a"
    counts = (
        "per-class training counts **shared**"
        if shared.get("class_counts")
        else "per-class training counts **not shared**"
    )
    keys = ", ".join(f"`{k}`" for k in shared.get("handshake_keys", []))
    stats = shared.get("teacher_head_statistics")
    extra = f"; teacher-head statistics: {stats}" if stats else ""
    calib = shared.get("calibration_statistics")
    extra += f"; calibration statistics: {calib}" if calib else ""
    return (
        f"{counts}; handshake keys: {keys}; each round: "
        f"{shared.get('per_round')}{extra}"
    )


def write_card(final_dir: Path, card: dict[str, Any]) -> None:
    """Write model_card.json and model_card.md next to the final model."""
    atomic_write_bytes(
        final_dir / "model_card.json", json.dumps(card, indent=2, default=str).encode()
    )
    atomic_write_bytes(final_dir / "model_card.md", render_markdown(card).encode())
