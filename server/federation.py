"""The server's federation loop: handshake, rounds, checkpoints, final model.

Flower's strategies supply the sampling and aggregation rules; this loop adds
what `Strategy.start` lacks for hospitals: resuming from a checkpoint, a
minimum number of sites per round with retries, a history row and an atomic
checkpoint per round, and a final model with its card.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import model_file
from common.config import ExperimentConfig
from common.errors import FedKDError
from common.models.student import count_params, create_student
from common.serialization import (
    EVAL_RECEIVED,
    EVAL_RECORD,
    PROJ_PREFIX,
    STUDENT_PREFIX,
    module_arrays,
    pack,
)
from server import checkpoint, history, model_card, privacy
from server.evaluation import GlobalEvaluator
from server.plots import plot_history
from server.strategy import (
    NODE_NAMES,
    RoundReport,
    build_strategy,
    site_eval_means,
)

log = logging.getLogger(__name__)


class FederationError(FedKDError):
    """The federation cannot go on (too few sites, sites that disagree)."""


def _config_record(
    cfg: ExperimentConfig, num_classes: int | None = None
) -> ConfigRecord:
    rec = ConfigRecord({"experiment": cfg.to_yaml()})
    if num_classes is not None:
        rec["num-classes"] = num_classes
    return rec


def handshake(grid: Grid, cfg: ExperimentConfig, expected: int) -> list[dict[str, Any]]:
    """Ask every connected site for its label space and sizes; check they agree."""
    deadline = time.monotonic() + cfg.federation.round_timeout
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {expected} sites connected within "
                f"{cfg.federation.round_timeout:g}s; check the SuperNodes"
            )
        time.sleep(0.5)
    content = RecordDict({"config": _config_record(cfg)})
    msgs = [
        Message(content=content, dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.round_timeout))
    infos, errors = [], []
    for msg in replies:
        if msg.has_error():
            errors.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
            continue
        rec = msg.content["site"]
        infos.append(
            {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}
        )
        NODE_NAMES[msg.metadata.src_node_id] = str(rec.get("name"))
    for e in errors:
        log.error("site handshake failed: %s", e)
    if len(infos) < cfg.federation.required_sites:
        detail = errors[0] if errors else "no reply"
        raise FederationError(
            f"{len(infos)} sites answered the handshake, federation.min_sites="
            f"{cfg.federation.min_sites}; first failure: {detail}"
        )
    check_sites_agree(infos)
    infos.sort(key=lambda i: str(i["name"]))
    return infos


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


def _train_round(
    strategy,
    grid: Grid,
    cfg: ExperimentConfig,
    rnd: int,
    arrays: ArrayRecord,
    train_conf: ConfigRecord,
):
    """Run one training round, retrying while fewer than min_sites replied."""
    fed = cfg.federation
    earlier: list[str] = []  # failures of retried attempts, kept for the history
    for attempt in range(fed.max_round_retries + 1):
        # Seed node sampling per (seed, round) so a resumed run samples alike.
        random.seed(cfg.train.seed * 100_003 + rnd * 101 + attempt)
        msgs = strategy.configure_train(rnd, arrays, train_conf, grid)
        replies = list(grid.send_and_receive(msgs, timeout=fed.round_timeout))
        new_arrays, metrics = strategy.aggregate_train(rnd, replies)
        report = strategy.report
        ok = report.accepted
        if new_arrays is not None and ok >= fed.required_sites:
            report.failed[:0] = earlier
            return new_arrays, metrics, report, attempt, replies
        earlier += [
            f"attempt {attempt + 1}: {f}" for f in report.failed + report.rejected
        ]
        log.warning(
            "round %d attempt %d: %d usable replies < min_sites=%d "
            "(failed: %s; rejected: %s)",
            rnd,
            attempt + 1,
            ok,
            fed.min_sites,
            report.failed,
            report.rejected,
        )
    raise FederationError(
        f"round {rnd}: fewer than federation.min_sites={fed.min_sites} sites returned "
        f"a usable update after {fed.max_round_retries + 1} attempts; failures: "
        f"{(report.failed + report.rejected)[:3]}"
    )


def _received_eval(replies: list[Message]) -> tuple[dict[str, Any], dict]:
    """(site-mean metrics, per-site `eval/` rows) of the model the sites received.

    With federation.eval_in_train each train reply carries them in EVAL_RECORD.
    """
    rows: dict[str, dict[str, float]] = {}
    for msg in replies:
        if msg.has_error() or EVAL_RECORD not in msg.content.config_records:
            continue
        name = str(msg.content["site"].get("name", msg.metadata.src_node_id))
        rows[name] = {k: float(v) for k, v in msg.content[EVAL_RECORD].items()}
    sites = {n: {f"eval/{k}": v for k, v in r.items()} for n, r in rows.items()}
    return site_eval_means(rows), sites


def _fill_eval(row: dict[str, Any], eval_metrics: dict, sites: dict) -> None:
    """Put site evaluation of row's model into the row (eval_in_train)."""
    row["eval"] = dict(eval_metrics or {})
    for name, values in sites.items():
        row["sites"].setdefault(name, {}).update(values)


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
    """The screened Flower strategy under an optional DP wrapper."""
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


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    expected_sites: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole federation; return the final metrics."""
    run_dir = Path(run_dir)
    hist_path = run_dir / "history.jsonl"
    expected = expected_sites or cfg.federation.required_sites
    infos = handshake(grid, cfg, expected)
    classes = [str(c) for c in infos[0]["classes"]]
    channels = int(infos[0]["channels"])
    feature_dim = int(max(i.get("teacher-feature-dim", 0) for i in infos))
    teacher = {
        "arch": cfg.teacher.arch if infos[0].get("teacher-used") else None,
        "weights_source": model_card.teacher_source(cfg, infos),
        "weights_spec": cfg.teacher.weights,
        "image_size": cfg.teacher.image_size,
        "head": cfg.teacher.head,
    }
    if teacher["weights_source"] == "random":
        log.warning(model_card.RANDOM_BANNER)
    strategy = build_strategy(cfg, len(infos))
    start = 1
    last: dict[str, Any] = {}
    # federation.eval_in_train: a round's row waits for its site evaluation,
    # which the sites send with the next round's train replies.
    in_train = cfg.federation.eval_in_train and cfg.federation.fraction_evaluate > 0
    pending: dict[str, Any] | None = None
    if resume:
        if cfg.federation.strategy == "local":
            # Each site's own model lives only in its process (context.state);
            # the checkpoint holds an average nobody trains from.
            raise FederationError(
                f"cannot resume {run_dir}: with federation.strategy=local each "
                "site's model is kept only in its process; start the run again"
            )
        ckpt = checkpoint.load_checkpoint(run_dir)
        arrays = pack(ckpt["arrays"])
        start = int(ckpt["round"]) + 1
        # A run killed after its last round but before `finish` has no round
        # left to run; its card still needs that round's metrics.
        last = dict(ckpt.get("last_row") or {})
        if cfg.privacy.dp:  # the accountant continues from the releases so far
            strategy.releases = int((last.get("privacy") or {}).get("releases", 0))
        _inner(strategy).load_optimizer_state(ckpt.get("optimizer_state") or {})
        if in_train and last:
            # The checkpoint's row still waits for its site evaluation, which
            # comes with the next round's train replies (or the final evaluate).
            pending = last
        history.truncate_to_round(
            hist_path, int(ckpt["round"]) - (1 if pending else 0)
        )
        log.info("resuming %s after round %d", run_dir, ckpt["round"])
    else:
        arrays = pack(initial_arrays(cfg, len(classes), channels, feature_dim))
        checkpoint.save_checkpoint(
            run_dir,
            0,
            _record_to_dict(arrays),
            {"config_yaml": cfg.to_yaml(), "sites": infos},
        )
    evaluator = GlobalEvaluator.maybe(cfg, classes)
    train_conf = _config_record(cfg, len(classes))
    eval_conf = _config_record(cfg, len(classes))
    for rnd in range(start, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        if in_train:  # ask the sites to evaluate what they receive (round rnd-1)
            train_conf = _config_record(cfg, len(classes))
            train_conf[EVAL_RECEIVED] = pending is not None and eval_due(cfg, rnd - 1)
        arrays, train_metrics, report, retries, replies = _train_round(
            strategy, grid, cfg, rnd, arrays, train_conf
        )
        t_train = time.perf_counter() - t0
        # With eval_in_train the round's accuracy line comes a round later.
        log.log(
            logging.INFO if in_train else logging.DEBUG,
            "round %d/%d trained: %d of %d sites replied (%.1fs)",
            rnd,
            cfg.federation.rounds,
            report.accepted,
            report.sampled,
            t_train,
        )
        if pending is not None:
            _fill_eval(pending, *_received_eval(replies))
            history.append_row(hist_path, pending)
            _log_row(cfg, pending)
            pending = None
        eval_metrics = None
        global_metrics: dict[str, Any] = {}
        val_metrics: dict[str, Any] = {}
        if eval_due(cfg, rnd):
            if cfg.federation.fraction_evaluate > 0 and not in_train:
                msgs = strategy.configure_evaluate(rnd, arrays, eval_conf, grid)
                replies = grid.send_and_receive(
                    msgs, timeout=cfg.federation.round_timeout
                )
                eval_metrics = strategy.aggregate_evaluate(rnd, replies)
            if evaluator:
                global_metrics, val_metrics = _global_eval(
                    cfg, evaluator, arrays, _inner(strategy).site_models
                )
        row = {
            "round": rnd,
            "seconds": time.perf_counter() - t0,
            "train_seconds": t_train,
            "retries": retries,
            "train": dict(train_metrics or {}),
            "eval": dict(eval_metrics or {}),
            "global": global_metrics,
            "global_val": val_metrics,
            "sites": report.sites,
            "failed": report.failed,
            "rejected": report.rejected,
            "bytes_down": report.bytes_down,
            "bytes_up": report.bytes_up,
            "teacher_weights": teacher["weights_source"],
        }
        if cfg.privacy.dp:
            # (epsilon, delta) so far, from dp-accounting (server/privacy.py)
            row["privacy"] = privacy.privacy_spent(
                cfg, strategy.releases, strategy.num_sampled_clients
            ).as_dict()
        if in_train:
            pending = row
        else:
            history.append_row(hist_path, row)
        checkpoint.save_checkpoint(
            run_dir,
            rnd,
            _record_to_dict(arrays),
            {
                "config_yaml": cfg.to_yaml(),
                "sites": infos,
                "last_row": row,
                "optimizer_state": _inner(strategy).optimizer_state(),
            },
        )
        last = row
        if not in_train:
            _log_row(cfg, row)
    if pending is not None:  # the final model: one evaluate message per site
        msgs = strategy.configure_evaluate(
            cfg.federation.rounds, arrays, eval_conf, grid
        )
        replies = grid.send_and_receive(msgs, timeout=cfg.federation.round_timeout)
        inner = _inner(strategy)
        inner.report = RoundReport()  # collects this evaluation only
        pending["eval"] = dict(
            strategy.aggregate_evaluate(cfg.federation.rounds, replies) or {}
        )
        for name, values in inner.report.sites.items():
            pending["sites"].setdefault(name, {}).update(values)
        pending["failed"] = list(pending["failed"]) + inner.report.failed
        pending["rejected"] = list(pending["rejected"]) + inner.report.rejected
        history.append_row(hist_path, pending)
        _log_row(cfg, pending)
        last = pending
    return finish(run_dir, cfg, arrays, infos, classes, channels, teacher, last)


def finish(
    run_dir: Path,
    cfg: ExperimentConfig,
    arrays: ArrayRecord,
    infos: list,
    classes: list[str],
    channels: int,
    teacher: dict,
    last: dict,
) -> dict:
    """Save the final student, its model card and the accuracy plot."""
    final_dir = run_dir / "final"
    final_dir.mkdir(parents=True, exist_ok=True)
    arr = _record_to_dict(arrays)
    model_file.save_student(
        final_dir / "model.pt", arr, cfg, classes, channels, teacher
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
