"""Calibration after the last round: the sites' sums give the pooled fit.

Every site is the real ClientApp on the in-process Grid, so the sums go
through the handlers, the wire and the server's reading of them.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from client.predict import main as predict_main
from client.site import site_cache
from common import calibration, ood
from common.model_file import load_model
from common.models.student import create_student, student_outputs
from common.serialization import STUDENT_PREFIX, load_into, module_arrays, pack
from server.calibration import calibrate
from server.federation import handshake, initial_arrays, run_federation
from server.rounds import RoundContext, SeededSampling
from simulations.inprocess import InProcessGrid
from tests.helpers import small_npz, tiny_config

SITES = 3


@pytest.fixture
def npz(pneumonia_npz, tmp_path_factory):
    return small_npz(pneumonia_npz, tmp_path_factory.mktemp("data") / "small.npz")


def _context(cfg, app=client_app) -> RoundContext:
    grid = InProcessGrid(app, SITES)
    _, names = handshake(grid, cfg, SITES)
    return RoundContext(
        cfg, grid, None, names, cfg.federation.min_sites, SeededSampling()
    )


def _sites(cfg):
    return [
        site_cache.site(cfg, {"partition-id": pid, "num-partitions": SITES})
        for pid in range(SITES)
    ]


def _informative_arrays(cfg):
    """A student trained a few steps on the sites' images, so that its logits
    carry information and the fitted temperature lies inside the grid."""
    torch.manual_seed(0)
    model = create_student(cfg.student.arch, 2, 1)
    x = torch.cat([s.train.x[0] for s in _sites(cfg)])
    y = torch.cat([s.train.y for s in _sites(cfg)])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return pack(module_arrays(model, STUDENT_PREFIX))


def _pooled(cfg, arrays, classwise: bool):
    """(T, reference, threshold) computed on the union of the sites' images."""
    model = create_student(cfg.student.arch, 2, 1)
    load_into(model, arrays, STUDENT_PREFIX)
    train_f, train_y, test_f, test_l, test_y = [], [], [], [], []
    for site in _sites(cfg):
        keep = site.train.labelled.numpy()
        f, _ = student_outputs(model, site.train.x[0])
        train_f.append(f.double().numpy()[keep])
        train_y.append(site.train.y.numpy()[keep])
        f, lo = student_outputs(model, site.test_x)
        test_f.append(f.double().numpy())
        test_l.append(lo.double().numpy())
        test_y.append(site.test_y.numpy())
    labels = np.concatenate(train_y) if classwise else None
    stats = ood.feature_stats(np.concatenate(train_f), labels, 2)
    ref = ood.fit_reference(stats, cfg.calibration.ood_shrinkage, classwise)
    hist = ood.score_histogram(ref.scores(np.concatenate(test_f)))
    threshold, _, _ = ood.threshold_from_histogram(hist, 0.05, 0.9)
    temp = calibration.fit_temperature(np.concatenate(test_l), np.concatenate(test_y))
    return temp, ref, threshold


@pytest.mark.parametrize("share_counts", [True, False])
def test_federated_calibration_equals_the_pooled_computation(
    npz, tmp_path, share_counts
):
    cfg = tiny_config(
        npz,
        tmp_path,
        "distill.alpha=1.0",
        f"privacy.share_class_counts={str(share_counts).lower()}",
    )
    arrays = _informative_arrays(cfg)

    fitted = calibrate(_context(cfg), arrays, 2, "chest X-ray, 28 px")

    temp, ref, threshold = _pooled(cfg, arrays, classwise=share_counts)
    assert 0.1 < temp < 15  # inside the grid: the sums decided it
    assert fitted.calibration.temperature == pytest.approx(temp, rel=1e-9)
    assert fitted.ood.classwise is share_counts
    assert fitted.ood.means.shape == (2 if share_counts else 1, 96)
    np.testing.assert_allclose(fitted.ood.means, ref.means, rtol=1e-9)
    scale = np.abs(ref.precision).max()  # entries near 0 differ by rounding
    np.testing.assert_allclose(
        fitted.ood.precision, ref.precision, rtol=1e-6, atol=1e-9 * scale
    )
    assert fitted.ood.threshold == threshold
    assert fitted.ood.data == "chest X-ray, 28 px"
    assert fitted.report["sites"] == ["site-0", "site-1", "site-2"]
    assert fitted.ood.held_out == sum(s.test_y.numel() for s in _sites(cfg))


def test_a_failing_site_is_left_out(npz, tmp_path, caplog):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0")

    def app(msg, ctx):
        if ctx.node_id == 2 and msg.metadata.message_type.startswith("query."):
            raise RuntimeError("the site's GPU fell off the bus")
        return client_app(msg, ctx)

    fitted = calibrate(_context(cfg, app), pack(initial_arrays(cfg, 2, 1, 0)), 2, "x")

    assert fitted.report["sites"] == ["site-0", "site-2"]
    assert fitted.calibration is not None and fitted.ood is not None
    assert "site site-1 failed" in caplog.text


def test_nothing_is_fitted_under_dp(npz, tmp_path):
    cfg = tiny_config(
        npz, tmp_path, "distill.alpha=1.0", "privacy.dp=true", "teacher.head=local"
    )

    fitted = calibrate(_context(cfg), pack(initial_arrays(cfg, 2, 1, 0)), 2, "x")

    assert fitted.calibration is None and fitted.ood is None
    assert "privacy.dp" in fitted.report["skipped"]


def test_a_federation_ends_with_a_calibrated_checked_model(npz, tmp_path, capsys):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "federation.rounds=1")
    grid = InProcessGrid(client_app, SITES)

    run_federation(grid, cfg, Path(cfg.run.out_dir), expected_sites=SITES)

    final = Path(cfg.run.out_dir) / "final"
    _, meta = load_model(final / "model.pt")
    assert meta.calibration is not None and meta.ood is not None
    assert meta.ood.data.endswith("28 px")
    md = (final / "model_card.md").read_text()
    assert "## Calibration and out-of-distribution check" in md
    assert "ECE on the global test" in md and "of the global test" in md
    assert (
        predict_main(
            [
                "--model",
                str(final / "model.pt"),
                str(npz),
                "--quiet",
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header.endswith(",in_distribution,ood_score")


@pytest.mark.parametrize("choice", ["auto", "validation", "sites"])
def test_a_simulation_fits_the_temperature_where_the_config_says(
    npz, tmp_path, choice
):
    """auto and validation: on the global validation split the server holds in a
    simulation (the images the global test resembles); sites: on the sites'
    summed held-out parts, as a deployment does."""
    from server.evaluation import GlobalEvaluator

    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "run.global_eval=true",
                      f"calibration.temperature_data={choice}")
    arrays = _informative_arrays(cfg)
    grid = InProcessGrid(client_app, SITES)
    infos, names = handshake(grid, cfg, SITES)
    ctx = RoundContext(cfg, grid, None, names, cfg.federation.min_sites,
                       SeededSampling())
    evaluator = GlobalEvaluator.maybe(cfg, [str(c) for c in infos[0].classes])
    logits, labels = evaluator.val_logits(arrays)

    fitted = calibrate(ctx, arrays, 2, "chest X-ray, 28 px", evaluator)

    on_val = calibration.fit_temperature(logits, labels)
    on_sites, _, _ = _pooled(cfg, arrays, classwise=True)
    assert abs(on_val - on_sites) > 1e-3  # the two fits differ here
    want = on_sites if choice == "sites" else on_val
    assert fitted.calibration.temperature == pytest.approx(want, rel=1e-9)
    where = "held-out test parts" if choice == "sites" else "validation split"
    assert where in fitted.calibration.fitted_on
    # the card reports the global test before and after, whichever data fitted T
    assert {"ece_global_test_before", "ece_global_test_after"} <= set(fitted.report)


def test_validation_asked_for_without_the_split_falls_back_to_the_sites_loudly(
    npz, tmp_path, caplog
):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0",
                      "calibration.temperature_data=validation")
    arrays = _informative_arrays(cfg)

    fitted = calibrate(_context(cfg), arrays, 2, "chest X-ray, 28 px", None)

    assert "held-out test parts" in fitted.calibration.fitted_on
    assert "holds no validation split" in caplog.text
