"""The membership audit's DP-SGD settings: the noise Opacus picks meets the target."""

from benchmarks import mia
from common.config import load_config
from common.data.experiment import dataset_for
from common.data.sites import partition_sites
from common.dp_sgd import epsilon, planned_steps, sample_rate
from simulations.run import DEFAULT_CONFIG
from tests.helpers import small_npz


def test_dp_sgd_noise_keeps_every_site_at_or_below_the_target(pneumonia_npz, tmp_path):
    small_npz(pneumonia_npz, tmp_path / "small.npz")
    over = mia._overrides(True, tmp_path, rounds=3, epochs=2)

    z = mia.dp_sgd_noise(over, 4.0)

    cfg = load_config(DEFAULT_CONFIG, [*over, "privacy.dp_sgd=true"])
    spent = []
    for site in partition_sites(dataset_for(cfg), cfg.partition, cfg.train.seed):
        n = int(site.labelled.sum())
        steps = 3 * planned_steps(n, cfg.train.batch_size, 2, 0)
        spent.append(epsilon([(z, sample_rate(n, cfg.train.batch_size), steps)], 1e-5))
    assert max(spent) <= 4.0 and max(spent) > 3.9  # the worst site gets the target
