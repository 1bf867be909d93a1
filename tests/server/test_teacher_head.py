"""teacher.head=closed_form: the head equals the pooled ridge probe and stays put."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common.config import config_from_yaml_text, load_config
from common.data.experiment import dataset_for
from common.data.sites import partition_sites
from common.errors import FedKDError, MessageError
from common.models import ridge
from common.serialization import STATS_RECORD, pack_stats
from server import checkpoint, history
from server.teacher_head import read_stats, solve_head
from simulations.run import main
from tests.helpers import TINY_TEACHER, small_npz


def _reply(content: RecordDict) -> Message:
    out = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1,
                  message_type=MessageType.QUERY)
    return Message(content, reply_to=out)


def test_missing_or_bad_statistics_name_the_site():
    with pytest.raises(MessageError, match="site 'site-1' sent no 'ridge-stats'"):
        read_stats(_reply(RecordDict({"site": ConfigRecord({"name": "site-1"})})),
                   "site-1")
    stats = ridge.to_arrays(ridge.site_stats(np.ones((4, 3)), np.array([0, 1] * 2), 2))
    stats["ridge.class_sum"] = np.ones((2, 5))
    with pytest.raises(MessageError, match="site 'site-2': bad ridge statistics"):
        read_stats(_reply(RecordDict({STATS_RECORD: pack_stats(stats)})), "site-2")


def test_a_class_no_site_holds_stops_the_run_with_its_name():
    one_class = ridge.site_stats(np.random.default_rng(0).normal(size=(6, 3)),
                                 np.zeros(6, dtype=int), 2)
    cfg = load_config(None, ["teacher.head=closed_form"])
    with pytest.raises(FedKDError, match="closed_form cannot be solved.*class 1"):
        solve_head(cfg, {"site-0": one_class}, ["no", "yes"])


@pytest.mark.slow
def test_closed_form_head_is_the_pooled_probe_in_every_round(pneumonia_npz, tmp_path):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz", n_train=80, n_test=20)
    out = tmp_path / "run"
    sets = [f"data.source=npz:{npz}", "data.image_size=28",
            f"data.cache_dir={tmp_path}/cache", *TINY_TEACHER,
            f"teacher.cache_dir={tmp_path}/tcache", "student.arch=fedkd_cnn_tiny",
            "partition.sites=2", "partition.alpha=0.5", "partition.min_site_size=5",
            "federation.rounds=2", "run.engine=inprocess", "run.global_eval=true",
            "teacher.head=closed_form", "teacher.head_lambda=0.5",
            "teacher.views=1", f"run.out_dir={out}"]
    assert main([x for s in sets for x in ("--set", s)]) == 0
    # the reference: the same teacher's features of the same sites, pooled here
    cfg = config_from_yaml_text((out / "config.yaml").read_text())  # as it ran
    from client.site import site_cache
    from common.distill.features import cached_features

    teacher = site_cache.teacher(cfg)
    pooled = []
    for s in partition_sites(dataset_for(cfg), cfg.partition, cfg.train.seed):
        f, _ = cached_features(cfg.teacher, s.train.images, 1, cfg.teacher.cache_dir,
                               lambda: teacher)
        pooled.append(ridge.site_stats(f[0].astype(np.float64), s.train.labels, 2))
    total = ridge.sum_stats(pooled)
    w, b = ridge.solve(total, 0.5)
    scale = ridge.gaussian_logit_scale(total, w, b)  # the server's calibration
    w, b = scale * w, scale * b
    ckpts = sorted((out / "checkpoints").glob("round-*.pt"))
    assert len(ckpts) == 3  # rounds 0, 1 and 2
    for ckpt in ckpts:
        arrays = checkpoint.load_checkpoint(ckpt)["arrays"]  # every round's model
        np.testing.assert_allclose(arrays["head.weight"], w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(arrays["head.bias"], b, rtol=1e-4, atol=1e-5)
    rows = history.read_rows(out / "history.jsonl")
    probes = [r["global"]["teacher_acc"] for r in rows]
    assert probes[0] == probes[-1]  # the teacher probe cannot drift
