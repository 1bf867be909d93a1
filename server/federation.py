"""The server's federation loop: handshake, rounds, checkpoints, final model.

Flower's strategies supply the sampling and aggregation rules; this loop adds
what `Strategy.start` lacks for hospitals: resuming from a checkpoint, a
minimum number of sites per round with retries, a history row and an atomic
checkpoint per round, and a final model with its card. `run_federation` reads
top to bottom: handshake, start (or resume), one `_run_round` per round, the
final evaluation (eval_in_train), the final model's calibration (temperature
and out-of-distribution check: server/calibration.py), `finish`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import model_file, timing
from common.config import ExperimentConfig
from common.distill.gate import federation_weight
from common.errors import MessageError
from common.models.student import count_params, create_student
from common.secure_sum import head_sums_secured
from common.serialization import (
    EVAL_RECEIVED,
    EVAL_RECORD,
    FEDERATION_KD_WEIGHT,
    PROFILE_RECORD,
    PROJ_PREFIX,
    STUDENT_PREFIX,
    module_arrays,
    pack,
)
from common.site_info import SiteInfo
from server import checkpoint, history, model_card, privacy
from server.calibration import Fitted, calibrate, training_data
from server.evaluation import GlobalEvaluator
from server.exchange import exchange
from server.plots import plot_history
from server.rounds import (
    FederationError,
    RoundContext,
    SeededSampling,
    evaluate_round,
    train_round,
)
from server.screening import RoundReport, site_name
from server.strategy import build_strategy, site_eval_means, sites_needed
from server.teacher_head import read_stats, secure_stats, solve_head, with_head

log = logging.getLogger(__name__)


def _config_record(
    cfg: ExperimentConfig, num_classes: int | None = None
) -> ConfigRecord:
    rec = ConfigRecord({"experiment": cfg.to_yaml()})
    if num_classes is not None:
        rec["num-classes"] = num_classes
    return rec


# -- handshake -----------------------------------------------------------------
def _wait_for_sites(grid: Grid, cfg: ExperimentConfig, expected: int) -> list[int]:
    """The connected node ids once `expected` are; FederationError at the timeout."""
    deadline = time.monotonic() + cfg.federation.round_timeout
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {expected} sites connected within "
                f"{cfg.federation.round_timeout:g}s; check the SuperNodes"
            )
        time.sleep(0.5)
    return nodes


def _read_site_info(msg: Message) -> SiteInfo:
    """The SiteInfo of a query reply; MessageError naming the site and key if not."""
    if "site" not in msg.content.config_records:
        raise MessageError("the handshake reply has no ConfigRecord 'site'")
    record = msg.content["site"]
    return SiteInfo.from_dict(
        {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
    )


def handshake(
    grid: Grid,
    cfg: ExperimentConfig,
    expected: int,
    stats: dict[str, Any] | None = None,
) -> tuple[list[SiteInfo], dict[int, str]]:
    """(every site's SiteInfo by name, site names by node id); check they agree.

    With teacher.head=closed_form, each site's ridge statistics are put into
    `stats` by site name.
    """
    nodes = _wait_for_sites(grid, cfg, expected)
    content = RecordDict({"config": _config_record(cfg)})
    msgs = [
        Message(content=content, dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    fed = cfg.federation
    replies = exchange(
        grid, msgs, timeout=fed.round_timeout, poll_interval=fed.poll_interval
    )
    infos, names, errors = [], {}, []
    timings: dict[str, dict[str, float]] = {}  # seconds per phase, by site name
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            errors.append(f"node {node}: {msg.error.reason}")
            continue
        try:  # a reply the server cannot read counts as a failed site
            info = _read_site_info(msg)
            if stats is not None and _closed_form(cfg, info):
                stats[info.name] = read_stats(msg, info.name)
        except MessageError as err:
            errors.append(f"node {node}: {err}")
            continue
        infos.append(info)
        names[node] = info.name
        timings[info.name] = dict(msg.content.config_records.get(PROFILE_RECORD, {}))
    for e in errors:
        log.error("site handshake failed: %s", e)
    log.info(
        "handshake: %d of %d sites answered%s",
        len(infos),
        len(msgs),
        slowest_site(timings, ""),
    )
    if len(infos) < cfg.federation.required_sites:
        detail = errors[0] if errors else "no reply"
        raise FederationError(
            f"{len(infos)} sites answered the handshake, federation.min_sites="
            f"{cfg.federation.min_sites}; first failure: {detail}"
        )
    check_sites_agree([i.to_dict() for i in infos])
    infos.sort(key=lambda i: i.name)
    return infos, names


def _closed_form(cfg: ExperimentConfig, info: SiteInfo) -> bool:
    """Whether this site's handshake carries ridge statistics for the head."""
    in_clear = cfg.teacher.head == "closed_form" and not head_sums_secured(cfg)
    return in_clear and info.teacher_used


def check_sites_agree(infos: list[dict[str, Any]]) -> None:
    """Stop with one line naming the sites when class names or channels differ."""
    for key, what, fix in (
        ("classes", "class names", "set data.classes in the experiment"),
        ("channels", "image channels", "export every site in one colour mode"),
    ):
        groups: dict[str, list[str]] = {}
        for info in infos:
            value = info[key]
            text = ",".join(map(str, value)) if isinstance(value, list) else value
            groups.setdefault(str(text), []).append(str(info.get("name")))
        if len(groups) > 1:
            detail = "; ".join(
                f"{'/'.join(sorted(names))}: {value}"
                for value, names in sorted(groups.items())
            )
            raise FederationError(
                f"sites disagree on {what}: {detail}; every site must use the "
                f"same ones ({fix})"
            )


def initial_arrays(
    cfg: ExperimentConfig, num_classes: int, channels: int, feature_dim: int
) -> dict[str, np.ndarray]:
    """The seeded initial student (and feature projection) every site starts from."""
    torch.manual_seed(cfg.train.seed)
    student = create_student(cfg.student.arch, num_classes, channels)
    arrays = module_arrays(student, STUDENT_PREFIX)
    if cfg.distill.feature_weight > 0 and feature_dim > 0:
        proj = torch.nn.Linear(student.num_features, feature_dim)
        arrays.update(module_arrays(proj, PROJ_PREFIX))
    return arrays


def _record_to_dict(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: rec[k].numpy() for k in rec.keys()}


# -- the loop's state ----------------------------------------------------------
@dataclass
class _Run:
    """What the federation loop carries from one round to the next."""

    cfg: ExperimentConfig
    run_dir: Path
    infos: list[SiteInfo]  # sorted by site name
    teacher: dict[str, Any]  # the model card's teacher entry
    ctx: RoundContext  # grid, strategy, site names, node sampling
    arrays: ArrayRecord | None = None  # the global model
    evaluator: GlobalEvaluator | None = None
    start: int = 1  # the first round to run
    last: dict[str, Any] = field(default_factory=dict)  # the newest history row
    # federation.eval_in_train: a round's row waits for its site evaluation,
    # which the sites send with the next round's train replies
    pending: dict[str, Any] | None = None
    # federation.strategy=local: each site's own model, by site name
    site_models: dict[str, ArrayRecord] = field(default_factory=dict)
    # teacher.head=closed_form: the sites' ridge statistics, and the head
    # solved from them, attached to the global model every round
    head_stats: dict[str, Any] = field(default_factory=dict)
    head: dict[str, np.ndarray] | None = None
    # distill.gate: the KD weight every site's summed per-class counts give,
    # sent with the next round for the sites that cannot judge alone
    gate_weight: float | None = None

    @property
    def classes(self) -> list[str]:
        """The label names every site agreed on."""
        return [str(c) for c in self.infos[0].classes]

    @property
    def channels(self) -> int:
        """The image channels every site agreed on."""
        return int(self.infos[0].channels)

    @property
    def site_rows(self) -> list[dict[str, Any]]:
        """The sites' handshake facts as kebab-case rows (checkpoint, model card)."""
        return [i.to_dict() for i in self.infos]

    @property
    def history_path(self) -> Path:
        """The run's history.jsonl."""
        return self.run_dir / "history.jsonl"

    @property
    def in_train(self) -> bool:
        """Whether the sites evaluate with the next round's train message."""
        fed = self.cfg.federation
        return fed.eval_in_train and fed.fraction_evaluate > 0


# -- start, rounds, finish -------------------------------------------------------
def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    expected_sites: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole federation; return the final metrics."""
    expected = expected_sites or cfg.federation.required_sites
    stats: dict[str, Any] = {}
    infos, names = handshake(grid, cfg, expected, stats)
    run = _start(grid, cfg, Path(run_dir), infos, names)
    if stats:  # solved from the sites of this (re)start
        run.head = solve_head(cfg, stats, run.classes)
    elif head_sums_secured(cfg) and any(i.teacher_used for i in infos):
        # the same sums, through SecAgg+
        total = secure_stats(grid, cfg, infos, names)
        run.head = solve_head(cfg, {"secure sum": total}, run.classes)
    if resume:
        _resume(run)
    else:
        _begin(run)
    run.evaluator = GlobalEvaluator.maybe(cfg, run.classes)
    for rnd in range(run.start, cfg.federation.rounds + 1):
        _run_round(run, rnd)
    if run.pending is not None:
        _evaluate_final(run)
    fitted = calibrate(
        run.ctx,
        run.arrays,
        len(run.classes),
        training_data(cfg, run.site_rows),
        run.evaluator,
    )
    return finish(
        run.run_dir,
        cfg,
        run.arrays,
        run.site_rows,
        run.classes,
        run.channels,
        run.teacher,
        run.last,
        fitted,
    )


def _start(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    infos: list[SiteInfo],
    names: dict[int, str],
) -> _Run:
    """The loop's state before any round: teacher entry, strategy, sampling."""
    rows = [i.to_dict() for i in infos]
    teacher = {
        "arch": cfg.teacher.arch if infos[0].teacher_used else None,
        "weights_source": model_card.teacher_source(cfg, rows),
        "weights_spec": cfg.teacher.weights,
        "image_size": cfg.teacher.image_size,
        "head": cfg.teacher.head,
    }
    if teacher["weights_source"] == "random":
        log.warning(model_card.RANDOM_BANNER)
    strategy = build_strategy(cfg, len(infos))
    needed = sites_needed(cfg, len(infos))
    ctx = RoundContext(cfg, grid, strategy, names, needed, SeededSampling(),
                       max(i.num_train for i in infos))
    return _Run(cfg, run_dir, infos, teacher, ctx)


def _begin(run: _Run) -> None:
    """A new run: the seeded initial model, saved as checkpoint 0."""
    feature_dim = max(i.teacher_feature_dim for i in run.infos)
    arrays = initial_arrays(run.cfg, len(run.classes), run.channels, feature_dim)
    run.arrays = with_head(pack(arrays), run.head)
    checkpoint.save_checkpoint(
        run.run_dir,
        0,
        _record_to_dict(run.arrays),
        {"config_yaml": run.cfg.to_yaml(), "sites": run.site_rows},
    )


def _resume(run: _Run) -> None:
    """Continue from the last checkpoint: model, server optimiser, DP releases."""
    cfg, strategy = run.cfg, run.ctx.strategy
    if cfg.federation.strategy == "local":
        # Each site's own model lives only in its process (context.state);
        # the checkpoint holds an average nobody trains from.
        raise FederationError(
            f"cannot resume {run.run_dir}: with federation.strategy=local each "
            "site's model is kept only in its process; start the run again"
        )
    ckpt = checkpoint.load_checkpoint(run.run_dir)
    # a closed-form head is solved again from the sites that answered now
    run.arrays = with_head(pack(ckpt["arrays"]), run.head)
    run.start = int(ckpt["round"]) + 1
    # A run killed after its last round but before `finish` has no round
    # left to run; its card still needs that round's metrics.
    run.last = dict(ckpt.get("last_row") or {})
    run.gate_weight = run.last.get("federation_kd_weight")
    if cfg.privacy.dp:  # the accountant continues from the releases so far
        strategy.releases = int((run.last.get("privacy") or {}).get("releases", 0))
    _inner(strategy).load_optimizer_state(ckpt.get("optimizer_state") or {})
    if run.in_train and run.last:
        # The checkpoint's row still waits for its site evaluation, which
        # comes with the next round's train replies (or the final evaluate).
        run.pending = run.last
    keep = int(ckpt["round"]) - (1 if run.pending else 0)
    history.truncate_to_round(run.history_path, keep)
    log.info("resuming %s after round %d", run.run_dir, ckpt["round"])


def _run_round(run: _Run, rnd: int) -> None:
    """Train round `rnd`, evaluate it when due, record it and checkpoint it."""
    cfg = run.cfg
    t0 = time.perf_counter()
    trained = train_round(run.ctx, rnd, run.arrays, _train_config(run, rnd))
    t_train = time.perf_counter() - t0
    run.arrays = with_head(trained.arrays, run.head)
    _update_gate(run, trained.accepted)
    if cfg.federation.strategy == "local":  # every site keeps its own model
        run.site_models = {
            site_name(m, run.ctx.names): m.content["arrays"] for m in trained.accepted
        }
    _log_trained(run, rnd, trained.report, t_train)
    if run.pending is not None:  # the previous row's site evaluation came along
        _fill_eval(run.pending, *_received_eval(trained.replies, run.ctx.names))
        history.append_row(run.history_path, run.pending)
        _log_row(cfg, run.pending)
        run.pending = None
    evaluated = _evaluate(run, rnd, trained.report)
    row = {
        "round": rnd,
        "seconds": time.perf_counter() - t0,
        "train_seconds": t_train,
        "retries": trained.retries,
        "train": dict(trained.metrics or {}),
        **evaluated,
        **_report_fields(trained.report),
        "teacher_weights": run.teacher["weights_source"],
        "federation_kd_weight": run.gate_weight,
    }
    if cfg.privacy.dp:
        # (epsilon, delta) so far, from dp-accounting (server/privacy.py)
        strategy = run.ctx.strategy
        row["privacy"] = privacy.privacy_spent(
            cfg, strategy.releases, strategy.num_sampled_clients
        ).as_dict()
    if cfg.privacy.dp_sgd:
        # each site's per-patient epsilon so far, from its train replies; their
        # example-weighted mean in row["train"] would mean nothing
        for key in privacy.PER_PATIENT_METRICS:
            row["train"].pop(key, None)
        row["privacy_per_patient"] = privacy.per_patient_spent(
            cfg, run.last.get("privacy_per_patient"), trained.replies, run.ctx.names
        )
    if run.in_train:
        run.pending = row
    else:
        history.append_row(run.history_path, row)
    _save(run, rnd, row)
    run.last = row
    if not run.in_train:
        _log_row(cfg, row)


def _update_gate(run: _Run, accepted: list[Message]) -> None:
    """The federation's KD-gate verdict from the sites' summed per-class counts."""
    d = run.cfg.distill
    if not d.gate:
        return
    weight = federation_weight(
        [dict(m.content["metrics"]) for m in accepted],
        floor=d.gate_floor,
        margin=d.gate_margin,
    )
    if weight is not None:  # no counts this round: the last verdict stands
        run.gate_weight = weight


def _train_config(run: _Run, rnd: int) -> ConfigRecord:
    """The round's train config; with eval_in_train, whether to evaluate first."""
    conf = _config_record(run.cfg, len(run.classes))
    if run.gate_weight is not None:
        conf[FEDERATION_KD_WEIGHT] = run.gate_weight
    if run.in_train:  # ask the sites to evaluate what they receive (round rnd-1)
        conf[EVAL_RECEIVED] = run.pending is not None and eval_due(run.cfg, rnd - 1)
    return conf


def _evaluate(run: _Run, rnd: int, report: RoundReport) -> dict[str, dict]:
    """The row's `eval`, `global` and `global_val` entries (when round is due)."""
    out: dict[str, dict] = {"eval": {}, "global": {}, "global_val": {}}
    if not eval_due(run.cfg, rnd):
        return out
    if run.cfg.federation.fraction_evaluate > 0 and not run.in_train:
        conf = _config_record(run.cfg, len(run.classes))
        metrics, evaluated = evaluate_round(run.ctx, rnd, run.arrays, conf)
        out["eval"] = dict(metrics)
        report.add(evaluated)
    if run.evaluator:
        out["global"], out["global_val"] = _global_eval(
            run.cfg, run.evaluator, run.arrays, run.site_models
        )
    return out


def _report_fields(report: RoundReport) -> dict[str, Any]:
    """The history row's entries from a round's report."""
    return {
        "sites": report.sites,
        "failed": report.failed,
        "rejected": report.rejected,
        "bytes_down": report.bytes_down,
        "bytes_up": report.bytes_up,
    }


def _save(run: _Run, rnd: int, row: dict[str, Any]) -> None:
    """Checkpoint round `rnd`: model, config, sites, its row, optimiser state."""
    checkpoint.save_checkpoint(
        run.run_dir,
        rnd,
        _record_to_dict(run.arrays),
        {
            "config_yaml": run.cfg.to_yaml(),
            "sites": run.site_rows,
            "last_row": row,
            "optimizer_state": _inner(run.ctx.strategy).optimizer_state(),
        },
    )


def _evaluate_final(run: _Run) -> None:
    """eval_in_train: the final model's site evaluation, one message per site."""
    rounds, pending = run.cfg.federation.rounds, run.pending
    conf = _config_record(run.cfg, len(run.classes))
    metrics, report = evaluate_round(run.ctx, rounds, run.arrays, conf)
    pending["eval"] = dict(metrics)
    for name, values in report.sites.items():
        pending["sites"].setdefault(name, {}).update(values)
    pending["failed"] = list(pending["failed"]) + report.failed
    pending["rejected"] = list(pending["rejected"]) + report.rejected
    history.append_row(run.history_path, pending)
    _log_row(run.cfg, pending)
    run.last, run.pending = pending, None


# -- rows and logs ---------------------------------------------------------------
def _received_eval(
    replies: list[Message], names: dict[int, str]
) -> tuple[dict[str, Any], dict]:
    """(site-mean metrics, per-site `eval/` rows) of the model the sites received.

    With federation.eval_in_train each train reply carries them in EVAL_RECORD.
    """
    rows: dict[str, dict[str, float]] = {}
    for msg in replies:
        if msg.has_error() or EVAL_RECORD not in msg.content.config_records:
            continue
        rows[site_name(msg, names)] = {
            k: float(v) for k, v in msg.content[EVAL_RECORD].items()
        }
    sites = {n: {f"eval/{k}": v for k, v in r.items()} for n, r in rows.items()}
    return site_eval_means(rows), sites


def _fill_eval(row: dict[str, Any], eval_metrics: dict, sites: dict) -> None:
    """Put site evaluation of row's model into the row (eval_in_train)."""
    row["eval"] = dict(eval_metrics or {})
    for name, values in sites.items():
        row["sites"].setdefault(name, {}).update(values)


def _log_trained(run: _Run, rnd: int, report: RoundReport, seconds: float) -> None:
    """One line per trained round (INFO with eval_in_train, whose row comes later)."""
    log.log(
        logging.INFO if run.in_train else logging.DEBUG,
        "round %d/%d trained: %d of %d sites replied (%.1fs)%s",
        rnd,
        run.cfg.federation.rounds,
        report.accepted,
        report.sampled,
        seconds,
        slowest_site(report.sites, "train/"),
    )


def slowest_site(sites: dict[str, dict[str, float]], prefix: str) -> str:
    """'; slowest site <name>: <phases>' from the sites' timings, or ''.

    The site whose message took longest sets the round's pace; its phases
    (common/timing.py) say where that time went.
    """
    profiles = {n: timing.from_metrics(v, prefix) for n, v in sites.items()}
    profiles = {n: p for n, p in profiles.items() if p}
    if not profiles:
        return ""
    name = max(profiles, key=lambda n: timing.wall_seconds(profiles[n]))
    return f"; slowest site {name}: {timing.describe(profiles[name])}"


def _log_row(cfg: ExperimentConfig, row: dict[str, Any]) -> None:
    """One progress line per round (forwarded to `flwr log` by server.app)."""
    global_metrics = row.get("global") or {}
    failed, rejected = row.get("failed") or [], row.get("rejected") or []
    log.info(
        "round %d/%d  sites %d replied  site-acc %.4f  worst %.4f  global-acc %s"
        "  (%.1fs)%s",
        row["round"],
        cfg.federation.rounds,
        len(row.get("sites") or {}),
        row["eval"].get("acc", float("nan")),
        row["eval"].get("worst_site_acc", float("nan")),
        f"{global_metrics['acc']:.4f}" if "acc" in global_metrics else "n/a",
        row["seconds"],
        f"  failed={len(failed)} rejected={len(rejected)}"
        if failed or rejected
        else "",
    )


def eval_due(cfg: ExperimentConfig, rnd: int) -> bool:
    """Whether round `rnd` is evaluated (every run.eval_every, and the last ones)."""
    rounds = cfg.federation.rounds
    return (
        rnd % cfg.run.eval_every == 0
        or rnd > rounds - cfg.run.eval_last
        or rnd == rounds
    )


def _inner(strategy):
    """The Flower strategy under an optional DP wrapper."""
    return getattr(strategy, "strategy", strategy)


def _global_eval(
    cfg: ExperimentConfig,
    evaluator: GlobalEvaluator,
    arrays: ArrayRecord,
    site_models: dict[str, ArrayRecord],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global-test metrics, validation metrics) of this round's model(s).

    With `local` every site keeps its own model; the method's global score is
    then each site's model on the global test split, averaged over sites.
    """
    if cfg.federation.strategy != "local":
        out = evaluator.evaluate(arrays)
        out.update(evaluator.evaluate_teacher(arrays))
        return out, evaluator.evaluate_val(arrays)
    per_site = {n: evaluator.evaluate(a) for n, a in sorted(site_models.items())}
    per_val = {n: evaluator.evaluate_val(a) for n, a in sorted(site_models.items())}

    def mean(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
        keys = set.intersection(*(set(r) for r in rows.values())) if rows else set()
        return {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}

    out = mean(per_site)
    if per_site:
        out["per_site"] = {n: r.get("acc") for n, r in per_site.items()}
    return out, mean(per_val)


def finish(
    run_dir: Path,
    cfg: ExperimentConfig,
    arrays: ArrayRecord,
    infos: list,
    classes: list[str],
    channels: int,
    teacher: dict,
    last: dict,
    fitted: Fitted | None = None,
) -> dict:
    """Save the final student (with its calibration), model card and plot."""
    final_dir = run_dir / "final"
    final_dir.mkdir(parents=True, exist_ok=True)
    arr = _record_to_dict(arrays)
    fitted = fitted or Fitted()
    model_file.save_student(
        final_dir / "model.pt",
        arr,
        cfg,
        classes,
        channels,
        teacher,
        calibration=fitted.calibration,
        ood=fitted.ood,
    )
    params = count_params(create_student(cfg.student.arch, len(classes), channels))
    metrics = {
        **{f"site_mean_{k}": v for k, v in last.get("eval", {}).items()},
        **{f"global_{k}": v for k, v in last.get("global", {}).items()},
        "per_site": last.get("sites", {}),
    }
    card = model_card.build_card(
        cfg,
        classes=classes,
        site_infos=infos,
        rounds_done=int(last.get("round", 0)),
        final_metrics=metrics,
        teacher=teacher,
        params=params,
        privacy=last.get("privacy"),
        calibration=fitted.report,
        privacy_per_patient=last.get("privacy_per_patient"),
    )
    model_card.write_card(final_dir, card)
    plot_history(
        history.read_rows(run_dir / "history.jsonl"),
        run_dir / "accuracy.png",
        title=f"{cfg.run.name}: {cfg.federation.strategy}"
        + (
            f" + KD (alpha {cfg.distill.alpha:g}, T {cfg.distill.temperature:g}), "
            f"teacher {teacher['weights_source'].upper()}"
            if teacher["arch"]
            else ", no teacher"
        ),
    )
    return metrics
