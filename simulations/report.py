"""Tables, a verdict and plots from the run folders of one harness experiment."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from server import history  # noqa: E402

SCALARS = ("site_acc", "site_auc", "worst_site_acc", "global_acc", "global_auc",
           "val_acc", "teacher_acc", "teacher_auc")
KD_VARIANTS = ("fedkd-federated", "fedkd-local", "fedkd")


def run_record(desc: dict[str, Any]) -> dict[str, Any] | None:
    """The final metrics and curve of one run (None if it has not finished)."""
    run_dir = Path(desc["run_dir"])
    card_path = run_dir / "final" / "model_card.json"
    rows = history.read_rows(run_dir / "history.jsonl")
    if not card_path.is_file() or not rows:
        return None
    card = json.loads(card_path.read_text())
    last = rows[-1]
    ev, gl = last.get("eval", {}), last.get("global", {})
    va = last.get("global_val", {})
    local = card["method"]["strategy"] == "local"
    rec = {
        **desc,
        "site_acc": ev.get("acc"),
        "site_auc": ev.get("auc"),
        "worst_site_acc": ev.get("worst_site_acc"),
        # A `local` run has no single model: the server's average is not a method.
        "global_acc": None if local else gl.get("acc"),
        "global_auc": None if local else gl.get("auc"),
        "val_acc": None if local else va.get("acc"),
        "teacher_acc": ev.get("teacher_acc"),
        "teacher_auc": ev.get("teacher_auc"),
        "per_site": {k: v.get("eval/acc") for k, v in last.get("sites", {}).items()},
        "curve": [(r["round"], (r.get("eval", {}) if local else r.get("global", {}))
                   .get("acc")) for r in rows],
        "teacher": card.get("teacher", {}),
        "data": {**card.get("data", {}), "classes": card["model"]["classes"]},
        "rounds": card["method"]["rounds"],
    }
    return rec


def _stat(values: list[float | None]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return float(np.mean(vals)), std, len(vals)


def _fmt(stat: tuple[float, float, int], pct: bool = True) -> str:
    mean, std, n = stat
    if n == 0 or math.isnan(mean):
        return "n/a"
    k = 100.0 if pct else 1.0
    return f"{mean * k:.1f} ± {std * k:.1f}"


def aggregate(records: list[dict]) -> dict[str, dict[str, Any]]:
    """Mean/std over seeds per (sweep value, method); teacher probes added."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["sweep_value"], r["method"]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for (sv, method), rs in groups.items():
        key = f"{method}" if sv is None else f"{method}@{sv}"
        out[key] = {"method": method, "sweep_value": sv,
                    "seeds": [r["seed"] for r in rs],
                    **{s: _stat([r[s] for r in rs]) for s in SCALARS}}
        if method.startswith("fedkd"):
            head = "federated" if method.endswith("federated") else "local"
            pkey = (f"teacher-probe-{head}" if sv is None
                    else f"teacher-probe-{head}@{sv}")
            out[pkey] = {"method": f"teacher-probe-{head}", "sweep_value": sv,
                         "seeds": [r["seed"] for r in rs],
                         **{s: (math.nan, math.nan, 0) for s in SCALARS},
                         "site_acc": _stat([r["teacher_acc"] for r in rs]),
                         "site_auc": _stat([r["teacher_auc"] for r in rs])}
    return out


def paired_gap(records: list[dict], a: str, b: str, metric: str, sv: Any = None
               ) -> tuple[float, float, int]:
    """Mean ± std over seeds of metric(a) - metric(b), paired by seed."""
    by = {(r["method"], r["seed"]): r[metric] for r in records
          if r["sweep_value"] == sv}
    diffs = [by[(a, s)] - by[(b, s)] for (m, s) in by if m == a
             and (b, s) in by and by[(a, s)] is not None and by[(b, s)] is not None]
    return _stat(diffs)


def verdict(records: list[dict], sv: Any = None) -> list[str]:
    """Plain sentences: did each fedkd variant beat fedavg, and by how much."""
    lines = []
    methods = {r["method"] for r in records}
    if "fedavg" not in methods:
        return ["No `fedavg` run in this experiment: no comparison is made."]
    for kd in (m for m in KD_VARIANTS if m in methods):
        for metric, name in (("global_acc", "global-test ACC"),
                             ("site_acc", "site-mean ACC")):
            mean, std, n = paired_gap(records, kd, "fedavg", metric, sv)
            if n == 0:
                continue
            pts = f"{mean * 100:+.1f} ± {std * 100:.1f} points ({n} seeds)"
            if mean > 0 and mean - std > 0:
                word = "beat"
            elif mean > 0:
                word = "beat on average, within the seed spread of,"
            else:
                word = "did NOT beat"
            lines.append(f"**{kd} {word} fedavg** on {name}: {pts}.")
    return lines


def _teacher_line(records: list[dict]) -> str:
    for r in records:
        t = r["teacher"]
        if t.get("arch"):
            src = str(t.get("weights_source", "?"))
            note = {"proxy": " — a PROXY teacher trained on a public pool no site "
                             "received (not DINOv2)",
                    "random": " — RANDOM-INIT: the soft targets carry no knowledge"}
            return (f"Teacher: `{t['arch']}` at {t.get('image_size')} px, weights "
                    f"**{src.upper()}** (`{t.get('weights_spec')}`)"
                    f"{note.get(src, '')}.")
    return "Teacher: none of the runs used one."


def _plots(records: list[dict], out: Path, sv: Any) -> list[str]:
    names = []
    recs = [r for r in records if r["sweep_value"] == sv]
    methods = sorted({r["method"] for r in recs})
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in methods:
        curves = [r["curve"] for r in recs if r["method"] == m]
        rounds = [c[0] for c in curves[0]]
        acc = np.array([[a if a is not None else np.nan for _, a in c]
                        for c in curves if len(c) == len(rounds)])
        ax.plot(rounds, np.nanmean(acc, 0), marker="o", ms=3,
                label=m + (" (site mean)" if m == "local" else ""))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (global test; local: site mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_round.png", dpi=100)
    plt.close(fig)
    names.append("accuracy_per_round.png")
    sites = sorted({s for r in recs for s in r["per_site"]},
                   key=lambda s: int(s.split("-")[-1]) if s[-1].isdigit() else 0)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals = [np.nanmean([r["per_site"].get(s, np.nan) or np.nan for r in recs
                            if r["method"] == m]) for s in sites]
        ax.bar(np.arange(len(sites)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites, fontsize=7)
    ax.set_ylabel("site test ACC (seed mean)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "per_site_acc.png", dpi=100)
    plt.close(fig)
    names.append("per_site_acc.png")
    fed = next((r for r in recs if r["method"] not in ("pooled", "pooled-kd")), None)
    if fed and fed["data"].get("sites"):
        infos = fed["data"]["sites"]
        counts = np.array([i.get("class-counts", []) for i in infos], dtype=float)
        if counts.ndim == 2 and counts.size:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            bottom = np.zeros(len(infos))
            classes = fed["data"].get("classes") or [
                f"class {c}" for c in range(counts.shape[1])]
            for c in range(counts.shape[1]):
                ax.bar([i["name"] for i in infos], counts[:, c], bottom=bottom,
                       label=str(classes[c]) if c < len(classes) else str(c))
                bottom += counts[:, c]
            ax.set_ylabel("training images")
            ax.set_title("class histogram per site (seed of first run)", fontsize=9)
            ax.legend(fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
            fig.tight_layout()
            fig.savefig(out / "class_histogram.png", dpi=100)
            plt.close(fig)
            names.append("class_histogram.png")
    if fed:
        names += _samples(Path(fed["run_dir"]), out)
    return names


def _samples(run_dir: Path, out: Path, per_site: int = 4) -> list[str]:
    """A grid of training images per site, showing each site's scanner profile."""
    from client.site import dataset_for
    from common.config import load_config
    from common.data.sites import build_sites

    cfg = load_config(run_dir / "config.yaml")
    sites = build_sites(dataset_for(cfg), cfg.partition, cfg.train.seed)[:8]
    fig, axes = plt.subplots(len(sites), per_site,
                             figsize=(per_site * 1.2, len(sites) * 1.25))
    axes = np.atleast_2d(axes)
    for i, s in enumerate(sites):
        for j in range(per_site):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(s.train):
                img = s.train.images[j]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray",
                          vmin=0, vmax=255)
        axes[i, 0].set_title(s.name, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out / "samples_per_site.png", dpi=90)
    plt.close(fig)
    return ["samples_per_site.png"]


def _sweep_plot(agg: dict, out: Path, key: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({v["method"] for v in agg.values()})
    for m in methods:
        pts = sorted((v["sweep_value"], v) for v in agg.values() if v["method"] == m)
        site_only = m.startswith(("local", "teacher-probe"))
        metric = "site_acc" if site_only else "global_acc"
        xs = [p[0] for p in pts]
        ys = [p[1][metric][0] for p in pts]
        es = [p[1][metric][1] for p in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("ACC (global test; local/probe: site mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sweep.png", dpi=100)
    plt.close(fig)
    return "accuracy_vs_sweep.png"


def _table(agg: dict, sv: Any) -> list[str]:
    lines = ["| method | site-mean ACC | site-mean AUC | worst-site ACC | global ACC "
             "| global AUC | val ACC | seeds |", "|---|---|---|---|---|---|---|---|"]
    for _, v in sorted(agg.items(), key=lambda kv: kv[0]):
        if v["sweep_value"] != sv:
            continue
        lines.append(
            f"| {v['method']} | {_fmt(v['site_acc'])} | {_fmt(v['site_auc'])} | "
            f"{_fmt(v['worst_site_acc'])} | {_fmt(v['global_acc'])} | "
            f"{_fmt(v['global_auc'])} | {_fmt(v['val_acc'])} | {len(v['seeds'])} |")
    return lines


def write_report(exp, descs: list[dict], out: Path) -> str:
    """Write results.json, report.md and the plots; return the verdict text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [r for d in descs if (r := run_record(d)) is not None]
    missing = len(descs) - len(records)
    agg = aggregate(records)
    axis = next(iter(exp.sweep), None)
    values = exp.sweep[axis] if axis else [None]
    first = records[0] if records else {}
    data = first.get("data", {})
    lines = [f"# {exp.name}", ""]
    if exp.description:
        lines += [exp.description, ""]
    lines += [
        _teacher_line(records), "",
        f"Data: `{data.get('source')}`, {len(data.get('sites', []))} sites "
        f"(federated methods), partition {data.get('partition')} "
        f"(alpha {data.get('alpha')}), shift {data.get('shift')}, labelled fraction "
        f"{data.get('labelled_fraction')}{' (swept)' if axis else ''}; "
        f"{first.get('rounds')} rounds; seeds {sorted(exp.seeds)}.", "",
        "ACC/AUC in %, mean ± std over seeds. *site-mean*: example-weighted mean over "
        "sites of each site's own test part (its own label mix and scanner); "
        "*worst-site*: the lowest site; *global*: the held-out test split, which no "
        "site holds and which carries no scanner shift; *val*: the validation split "
        "(what defaults are chosen by). `local` has no single model, so no global "
        "number. `teacher-probe-*` is the teacher with its head alone on the sites' "
        "test parts.", "",
    ]
    if missing:
        lines += [f"**{missing} runs had not finished and are left out.**", ""]
    for sv in values:
        if axis:
            lines += [f"## {axis} = {sv}", ""]
        lines += ["### Verdict", ""] + verdict(records, sv) + [""]
        lines += ["### Results", ""] + _table(agg, sv) + [""]
        recs = [r for r in records if r["sweep_value"] == sv]
        sites = sorted({s for r in recs for s in r["per_site"]})
        if sites and len(sites) <= 16:
            lines += ["### Per-site test ACC (seed mean, %)", "",
                      "| method | " + " | ".join(sites) + " |",
                      "|---|" + "---|" * len(sites)]
            for m in sorted({r["method"] for r in recs}):
                cells = []
                for s in sites:
                    vals = [r["per_site"].get(s) for r in recs if r["method"] == m]
                    vals = [v for v in vals if v is not None]
                    cells.append(f"{100 * np.mean(vals):.1f}" if vals else "–")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    plots = _plots(records, out, values[-1]) if records else []
    if axis and records:
        plots.insert(0, _sweep_plot(agg, out, axis))
    lines += ["## Figures", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Produced by `python -m simulations.harness --experiment "
              f"{exp.report.get('experiment_path', '<file>')} --out {out}`.", ""]
    (out / "report.md").write_text("\n".join(lines))
    results = {
        "experiment": exp.name, "sweep": exp.sweep, "seeds": exp.seeds,
        "summary": {k: {s: (list(v[s]) if isinstance(v[s], tuple) else v[s])
                        for s in ("method", "sweep_value", "seeds", *SCALARS)}
                    for k, v in agg.items()},
        "runs": [{k: v for k, v in r.items() if k not in ("curve", "data")}
                 for r in records],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return "\n".join(sum((verdict(records, sv) for sv in values), []))
