"""Tables, a verdict and plots from the run folders of one harness experiment."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from server import history  # noqa: E402

log = logging.getLogger(__name__)

# Final-round and last-k-round means; `global_*` on the global test split (no
# site holds it), `site_*` over the sites' own test parts, never mixed.
GLOBAL = ("acc", "bacc", "auc")
SCALARS = (
    *(f"global_{m}" for m in GLOBAL),
    *(f"global_{m}_lastk" for m in GLOBAL),
    "val_acc", "val_acc_lastk", "site_acc", "site_auc", "site_acc_lastk",
    "worst_site_acc", "teacher_global_acc", "teacher_global_auc", "teacher_site_acc",
    "teacher_site_auc", "kd_weight", "seconds", "val_auc_slope", "sample_grads",
    "pooled_probe_acc", "pooled_probe_auc",
)
KD_VARIANTS = ("fedkd-federated", "fedkd-local", "fedkd")
PRIMARY = "global_acc_lastk"
# a method whose validation AUC still rises faster than this (points per round,
# least squares over the last SLOPE_WINDOW rounds) is flagged "not converged"
SLOPE_LIMIT = 0.2
SLOPE_WINDOW = 10
# the IID sanity anchor: FedAvg on IID, unshifted sites within this many points
# of pooled training on the same images (docs/results/federated-gap)
ANCHOR_POINTS = 2.0


def _mean_last(rows: list[dict], section: str, key: str, k: int) -> float | None:
    """Mean of rows[*][section][key] over the last k rows that have it."""
    vals = [r[section][key] for r in rows
            if isinstance(r.get(section), dict) and key in r[section]]
    return float(np.mean(vals[-k:])) if vals else None


def _last(rows: list[dict], section: str, key: str) -> float | None:
    return _mean_last(rows, section, key, 1)


def val_auc_slope(rows: list[dict], window: int = SLOPE_WINDOW) -> float | None:
    """Least-squares slope of validation AUC (points per round) over the last rounds.

    Uses the evaluated rounds among the last `window`; None with fewer than 3.
    """
    last = max((r["round"] for r in rows), default=0)
    pts = [(r["round"], 100.0 * r["global_val"]["auc"]) for r in rows
           if r["round"] > last - window and "auc" in (r.get("global_val") or {})]
    if len(pts) < 3:
        return None
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def sample_grads(rows: list[dict]) -> float | None:
    """Sample-gradients spent by all sites over the run (None for older runs)."""
    vals = [v.get("train/train_samples") for r in rows
            for v in (r.get("sites") or {}).values()]
    vals = [v for v in vals if v is not None]
    return float(sum(vals)) if vals else None


def run_record(desc: dict[str, Any], k: int = 5) -> dict[str, Any] | None:
    """The final and last-k metrics and the curve of one run (None if unfinished)."""
    run_dir = Path(desc["run_dir"])
    card_path = run_dir / "final" / "model_card.json"
    rows = history.read_rows(run_dir / "history.jsonl")
    if not card_path.is_file() or not rows:
        return None
    card = json.loads(card_path.read_text())
    rec = {**desc, "last_k": k}
    for m in GLOBAL:
        rec[f"global_{m}"] = _last(rows, "global", m)
        rec[f"global_{m}_lastk"] = _mean_last(rows, "global", m, k)
    rec["val_acc"] = _last(rows, "global_val", "acc")
    rec["val_acc_lastk"] = _mean_last(rows, "global_val", "acc", k)
    rec["site_acc"] = _last(rows, "eval", "acc")
    rec["site_auc"] = _last(rows, "eval", "auc")
    rec["site_acc_lastk"] = _mean_last(rows, "eval", "acc", k)
    rec["worst_site_acc"] = _last(rows, "eval", "worst_site_acc")
    rec["teacher_global_acc"] = _last(rows, "global", "teacher_acc")
    rec["teacher_global_auc"] = _last(rows, "global", "teacher_auc")
    rec["teacher_site_acc"] = _last(rows, "eval", "teacher_acc")
    rec["teacher_site_auc"] = _last(rows, "eval", "teacher_auc")
    rec["kd_weight"] = _mean_last(rows, "train", "kd_weight", k)
    rec["seconds"] = float(sum(r.get("seconds", 0.0) for r in rows))
    rec["val_auc_slope"] = val_auc_slope(rows)
    rec["sample_grads"] = sample_grads(rows)
    evaluated = [r for r in rows if r.get("eval")]
    last = evaluated[-1] if evaluated else rows[-1]
    rec["per_site"] = {n: v.get("eval/acc") for n, v in last.get("sites", {}).items()}
    rec["curve"] = [(r["round"], r.get("global", {}).get("acc")) for r in rows
                    if r.get("global")]
    rec["teacher"] = card.get("teacher", {})
    rec["data"] = {**card.get("data", {}), "classes": card["model"]["classes"]}
    rec["rounds"] = card["method"]["rounds"]
    probed = rec["teacher_global_acc"] is not None
    ceiling = pooled_probe(run_dir) if probed else {}
    rec["pooled_probe_acc"] = ceiling.get("test_acc")
    rec["pooled_probe_auc"] = ceiling.get("test_auc")
    return rec


def pooled_probe(run_dir: Path) -> dict[str, float]:
    """The teacher's ceiling for a KD run: the pooled ridge probe (simulations.probe).

    The closed-form ridge head fitted on the union of the sites' training
    features, scored on the global test split; computed once from the run's
    config (the teacher's features come from its feature cache) and kept in
    `<run>/pooled_probe.json`. {} when it cannot be computed (the reason is
    logged): the column then shows a dash.
    """
    cached = run_dir / "pooled_probe.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from common.config import load_config
    from common.errors import FedKDError
    from simulations.probe import probe

    try:
        cfg = load_config(run_dir / "config.yaml")
        scores = probe(cfg, cfg.teacher.head_lambda)["pooled"]
    except (FedKDError, OSError, ValueError, KeyError) as err:
        log.warning("pooled probe of %s not computed: %s", run_dir, err)
        return {}
    if "error" in scores:
        log.warning("pooled probe of %s: %s", run_dir, scores["error"])
        return {}
    cached.write_text(json.dumps(scores))
    return scores


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
    """Mean/std over seeds of every scalar, per (sweep value, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["sweep_value"], r["method"]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for (sv, method), rs in groups.items():
        key = f"{method}" if sv is None else f"{method}@{sv}"
        out[key] = {"method": method, "sweep_value": sv,
                    "seeds": sorted(r["seed"] for r in rs),
                    **{s: _stat([r.get(s) for r in rs]) for s in SCALARS}}
    return out


def paired_diff(records: list[dict], a: str, b: str, metric: str = PRIMARY,
                sv: Any = None, level: float = 0.95) -> dict[str, Any]:
    """metric(a) - metric(b) paired by seed: mean, t-interval, n, per-seed diffs."""
    from scipy import stats

    by = {(r["method"], r["seed"]): r.get(metric) for r in records
          if r["sweep_value"] == sv}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by
                   and by[(a, s)] is not None and by[(b, s)] is not None)
    diffs = np.array([by[(a, s)] - by[(b, s)] for s in seeds], dtype=float)
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": math.nan, "lo": math.nan, "hi": math.nan,
                "seeds": [], "diffs": []}
    mean = float(diffs.mean())
    if n > 1:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * diffs.std(ddof=1)
                     / math.sqrt(n))
    else:
        half = math.inf
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half,
            "seeds": seeds, "diffs": diffs.tolist()}


def interval_word(d: dict[str, Any]) -> str:
    """The verdict an interval supports: beats / worse / no detectable difference."""
    if d["n"] < 2:
        return "cannot be compared (fewer than 2 paired seeds)"
    if d["lo"] > 0:
        return "beats"
    if d["hi"] < 0:
        return "is worse than"
    return "shows no detectable difference from"


def verdict(records: list[dict], sv: Any = None, ref: str = "fedavg",
            metric: str = PRIMARY) -> list[str]:
    """One sentence per method against `ref`, worded from the paired 95 % interval."""
    methods = sorted({r["method"] for r in records if r["sweep_value"] == sv})
    if ref not in methods:
        return [f"No `{ref}` run in this experiment: no comparison is made."]
    lines = []
    for m in methods:
        if m == ref:
            continue
        d = paired_diff(records, m, ref, metric, sv)
        if d["n"] == 0:
            continue
        if d["n"] == 1:
            lines.append(f"- {m} − {ref} on {metric.replace('_', ' ')}: "
                         f"{d['mean'] * 100:+.1f} points on one seed (no interval "
                         "and no verdict from fewer than 2 seeds).")
            continue
        lines.append(
            f"- **{m} {interval_word(d)} {ref}** on {metric.replace('_', ' ')}: "
            f"{d['mean'] * 100:+.1f} points, 95 % CI [{d['lo'] * 100:+.1f}, "
            f"{d['hi'] * 100:+.1f}] (paired over {d['n']} seeds)."
        )
    return lines


def _teacher_line(records: list[dict]) -> str:
    specs = {str(r["teacher"].get("weights_spec")) for r in records
             if r["teacher"].get("weights_source") == "proxy"}
    if len(specs) > 1:
        return (f"Teacher: a **PROXY** per seed ({len(specs)} proxy files): each a "
                "resnet18 trained only on that seed's public pool, which no site "
                "received (not DINOv2). Methods that name their own teacher say so "
                "in their overrides.")
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


def _save(fig: Any, out: Path, name: str) -> str:
    """Lay out, write and close a figure; return its file name."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _accuracy_plot(recs: list[dict], methods: list[str], out: Path) -> str:
    """Global-test ACC per round, seed mean, one line per method."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in methods:
        curves = [r["curve"] for r in recs if r["method"] == m]
        rounds = [c[0] for c in curves[0]]
        acc = np.array([[a if a is not None else np.nan for _, a in c]
                        for c in curves if len(c) == len(rounds)])
        if not rounds or not acc.size:
            continue
        line = ax.plot(
            rounds, np.nanmean(acc, 0), marker="o", ms=3,
            label=m + (" (mean of the sites' own models)" if m == "local" else ""))
        ends = [r["global_acc_lastk"] for r in recs
                if r["method"] == m and r.get("global_acc_lastk") is not None]
        if m.startswith("pooled") and ends:  # the ceiling: where pooling ends
            end = float(np.mean(ends))
            ax.axhline(end, ls="--", lw=1, color=line[0].get_color(),
                       label=f"{m} ends at {end:.3f} (last-k)")
    ax.set_xlabel("round")
    ax.set_ylabel("global-test ACC (seed mean)")
    src = next((str(r["teacher"].get("weights_source", "")) for r in recs
                if r["teacher"].get("arch")), "")
    if src:
        note = {"proxy": "PROXY teacher (not DINOv2)",
                "random": "RANDOM-INIT teacher"}.get(src, f"teacher {src}")
        ax.set_title(f"global-test ACC per round; KD runs: {note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, "accuracy_per_round.png")


def _per_site_plot(recs: list[dict], methods: list[str], out: Path) -> str:
    """Each site's own test ACC, seed mean, one bar per method."""
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
    return _save(fig, out, "per_site_acc.png")


def _class_histogram(fed: dict, out: Path) -> list[str]:
    """Training images per class and site, from one federated run's handshake."""
    infos = fed["data"].get("sites")
    counts = np.array([i.get("class-counts", []) for i in infos or []], dtype=float)
    if not infos or counts.ndim != 2 or not counts.size:
        return []
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
    return [_save(fig, out, "class_histogram.png")]


def _plots(records: list[dict], out: Path, sv: Any) -> list[str]:
    """The figures of one sweep value; return their file names."""
    recs = [r for r in records if r["sweep_value"] == sv]
    methods = sorted({r["method"] for r in recs})
    names = [_accuracy_plot(recs, methods, out), _per_site_plot(recs, methods, out)]
    fed = next((r for r in recs if r["method"] not in ("pooled", "pooled-kd")), None)
    if fed:
        names += _class_histogram(fed, out) + _samples(Path(fed["run_dir"]), out)
    return names


def _samples(run_dir: Path, out: Path, per_site: int = 4) -> list[str]:
    """A grid of training images per site, showing each site's scanner profile."""
    from common.config import load_config
    from common.data.experiment import dataset_for
    from common.data.sites import partition_sites

    cfg = load_config(run_dir / "config.yaml")
    sites = partition_sites(dataset_for(cfg), cfg.partition, cfg.train.seed)[:8]
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
        metric = PRIMARY
        xs = [p[0] for p in pts]
        ys = [p[1][metric][0] for p in pts]
        es = [p[1][metric][1] for p in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("global-test ACC, mean of the last k rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sweep.png", dpi=100)
    plt.close(fig)
    return "accuracy_vs_sweep.png"


def _slope_cell(stat: tuple[float, float, int]) -> str:
    """Seed-mean slope of val AUC, flagged when the method is still rising."""
    mean, _, n = stat
    if n == 0:
        return "n/a"
    flag = " **not converged**" if mean > SLOPE_LIMIT else ""
    return f"{mean:+.2f}/round{flag}"


def _grads_cell(stat: tuple[float, float, int]) -> str:
    mean, _, n = stat
    return "n/a" if n == 0 else f"{mean / 1000:.0f}"


def sanity_anchor(records: list[dict], report: dict, sv: Any = None) -> list[str]:
    """The IID sanity row: federated vs pooled on IID, unshifted sites.

    `report: {anchor: [fedavg-iid, pooled-iid]}` names the two methods; the
    anchor holds when the federated arm is within ANCHOR_POINTS of pooled.
    """
    pair = report.get("anchor")
    if not pair:
        return []
    fed, pooled = pair
    d = paired_diff(records, fed, pooled, PRIMARY, sv)
    if d["n"] == 0:
        return [f"**IID sanity anchor: not measured** (no paired runs of {fed} and "
                f"{pooled}).", ""]
    holds = d["mean"] * 100 >= -ANCHOR_POINTS
    word = "holds" if holds else "FAILS"
    ci = (f", 95 % CI [{d['lo'] * 100:+.1f}, {d['hi'] * 100:+.1f}]" if d["n"] > 1
          else " (one seed, no interval)")
    return [f"**IID sanity anchor {word}**: {fed} − {pooled} = "
            f"{d['mean'] * 100:+.1f} points on global ACC last-k{ci}, over "
            f"{d['n']} seeds (must be within {ANCHOR_POINTS:g} points: the check "
            "that the federated optimiser is right).", ""]


def _table(agg: dict, sv: Any) -> list[str]:
    """Two tables: the global test (every method, one test set) and site means."""
    rows = [v for _, v in sorted(agg.items()) if v["sweep_value"] == sv]
    lines = ["Global test split (every method scored on the same images):", "",
             "| method | ACC last-k | ACC final | bal. ACC last-k | bal. ACC final "
             "| AUC last-k | AUC final | val ACC last-k | teacher probe ACC / AUC "
             "(pooled probe ACC: the ceiling) "
             "| val AUC slope, last 10 rounds | sample-grads (k) | seeds | min/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in rows:
        probe = ("–" if v["teacher_global_acc"][2] == 0 else
                 f"{_fmt(v['teacher_global_acc'])} / {_fmt(v['teacher_global_auc'])}"
                 + ("" if v["pooled_probe_acc"][2] == 0 else
                    f" ({_fmt(v['pooled_probe_acc'])})"))
        lines.append(
            f"| {v['method']} | {_fmt(v['global_acc_lastk'])} | "
            f"{_fmt(v['global_acc'])} | {_fmt(v['global_bacc_lastk'])} | "
            f"{_fmt(v['global_bacc'])} | {_fmt(v['global_auc_lastk'])} | "
            f"{_fmt(v['global_auc'])} | {_fmt(v['val_acc_lastk'])} | {probe} | "
            f"{_slope_cell(v['val_auc_slope'])} | {_grads_cell(v['sample_grads'])} | "
            f"{len(v['seeds'])} | {v['seconds'][0] / 60:.1f} |")
    lines += ["", "Site means (each site's own test part: its label mix and scanner; "
              "not comparable with the table above):", "",
              "| method | site-mean ACC last-k | site-mean ACC final | site-mean AUC "
              "| worst-site ACC | teacher probe on site tests | KD weight (last-k) |",
              "|---|---|---|---|---|---|---|"]
    for v in rows:
        probe = "–" if v["teacher_site_acc"][2] == 0 else _fmt(v["teacher_site_acc"])
        kdw = "–" if v["kd_weight"][2] == 0 else _fmt(v["kd_weight"], pct=False)
        lines.append(
            f"| {v['method']} | {_fmt(v['site_acc_lastk'])} | {_fmt(v['site_acc'])} | "
            f"{_fmt(v['site_auc'])} | {_fmt(v['worst_site_acc'])} | {probe} | {kdw} |")
    return lines


def _alpha(data: dict) -> str:
    """' (alpha a)' for a Dirichlet partition; other schemes do not use alpha."""
    if data.get("partition") != "dirichlet":
        return ""
    return f" (alpha {data.get('alpha')})"


def _header(exp, records: list[dict], descs: list[dict], axis: str | None) -> list[str]:
    """Title, teacher, data, how to read the tables, and runs left out."""
    first = records[0] if records else {}
    data = first.get("data", {})
    lines = [f"# {exp.name}", ""]
    if exp.description:
        lines += [exp.description, ""]
    lines += [
        _teacher_line(records), "",
        f"Data: `{data.get('source')}`, {len(data.get('sites', []))} sites "
        f"(federated methods), partition {data.get('partition')}"
        f"{_alpha(data)}, shift {data.get('shift')}, labelled fraction "
        f"{data.get('labelled_fraction')}{' (swept)' if axis else ''}; "
        f"{first.get('rounds')} rounds; seeds {sorted(exp.seeds)}.", "",
        f"ACC/AUC in %, mean ± std over seeds; *last-k*: mean over the last "
        f"{first.get('last_k', 5)} evaluated rounds of each run (one round's ACC "
        "swings "
        "under label skew), *final*: the last round. *Global*: the held-out test "
        "split, which no site holds and which carries no scanner shift; `local` is "
        "each site's own model on it, averaged over sites; the teacher probe is "
        "the federated head on it. *val*: the validation split (what defaults are "
        "chosen by). Verdicts are paired differences per seed against `fedavg` "
        "with a 95 % t-interval: *beats* when the interval is above 0, *worse* "
        "when below, otherwise *no detectable difference*.", "",
    ]
    missing = len(descs) - len(records)
    if missing:
        done = {r["method"] for r in records}
        absent = sorted({d["method"] for d in descs} - done)
        lines += [f"**{missing} runs had not finished and are left out**"
                  + (f" (no finished run of: {', '.join(absent)})" if absent else "")
                  + ".", ""]
    return lines


def _per_site_table(recs: list[dict]) -> list[str]:
    """Seed-mean test ACC of each method on each site (up to 16 sites)."""
    sites = sorted({s for r in recs for s in r["per_site"]})
    if not sites or len(sites) > 16:
        return []
    lines = ["### Per-site test ACC (seed mean, %)", "",
             "| method | " + " | ".join(sites) + " |",
             "|---|" + "---|" * len(sites)]
    for m in sorted({r["method"] for r in recs}):
        cells = []
        for s in sites:
            vals = [r["per_site"].get(s) for r in recs if r["method"] == m]
            vals = [v for v in vals if v is not None]
            cells.append(f"{100 * np.mean(vals):.1f}" if vals else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _sweep_section(exp, records: list[dict], agg: dict, sv: Any) -> list[str]:
    """Anchor, verdicts, result tables and per-site table of one sweep value."""
    lines = sanity_anchor(records, exp.report, sv)
    lines += ["### Verdict", ""] + verdict(records, sv) + [""]
    for ref in exp.report.get("references", []):
        lines += [f"Against `{ref}`:", ""] + verdict(records, sv, ref=ref) + [""]
    lines += ["### Results", ""] + _table(agg, sv) + [""]
    recs = [r for r in records if r["sweep_value"] == sv]
    return lines + _per_site_table(recs)


def _results(exp, records: list[dict], agg: dict, axis: str | None,
             values: list) -> dict[str, Any]:
    """The content of results.json: paired differences, summaries and runs."""
    return {
        "experiment": exp.name, "sweep": exp.sweep, "seeds": exp.seeds,
        "paired_vs_fedavg": {
            f"{m}@{sv}" if axis else m: paired_diff(records, m, "fedavg", PRIMARY, sv)
            for sv in values
            for m in sorted({r["method"] for r in records if r["sweep_value"] == sv})
            if m != "fedavg"},
        "summary": {k: {s: (list(v[s]) if isinstance(v[s], tuple) else v[s])
                        for s in ("method", "sweep_value", "seeds", *SCALARS)}
                    for k, v in agg.items()},
        "runs": [{k: v for k, v in r.items() if k not in ("curve", "data")}
                 for r in records],
    }


def write_report(exp, descs: list[dict], out: Path) -> str:
    """Write results.json, report.md and the plots; return the verdict text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = int(exp.report.get("last_k", 5))
    records = [r for d in descs if (r := run_record(d, k)) is not None]
    agg = aggregate(records)
    axis = next(iter(exp.sweep), None)
    values = exp.sweep[axis] if axis else [None]
    lines = _header(exp, records, descs, axis)
    for sv in values:
        if axis:
            lines += [f"## {axis} = {sv}", ""]
        lines += _sweep_section(exp, records, agg, sv)
    plots = _plots(records, out, values[-1]) if records else []
    if axis and records:
        plots.insert(0, _sweep_plot(agg, out, axis))
    lines += ["## Figures", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Produced by `python -m simulations.harness --experiment "
              f"{exp.report.get('experiment_path', '<file>')} --out {out}`.", ""]
    (out / "report.md").write_text("\n".join(lines))
    results = _results(exp, records, agg, axis, values)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return "\n".join(sum((verdict(records, sv) for sv in values), []))
