"""Server-side evaluation of the global student on a held-out global test set."""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.config import ExperimentConfig
from common.data.sources import load_dataset
from common.data.views import decode_size, to_student_tensor
from common.errors import FedKDError
from common.models.head import head_logits
from common.models.student import create_student, student_outputs
from common.serialization import HEAD_PREFIX, STUDENT_PREFIX, load_into
from common.train import evaluate, evaluate_logits

log = logging.getLogger(__name__)


class GlobalEvaluator:
    """Holds the global test tensors; evaluates arrays each round."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        classes: list[str],
        x: torch.Tensor,
        y: torch.Tensor,
        channels: int,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.cfg, self.classes, self.x, self.y = cfg, classes, x, y
        self.channels = channels
        self.val = val
        # uint8 test images at decode size, for the teacher probe (lazy features)
        self.test_images: np.ndarray | None = None
        self._teacher_feats: torch.Tensor | None = None

    @classmethod
    def maybe(cls, cfg: ExperimentConfig, classes: list[str]) -> GlobalEvaluator | None:
        """An evaluator on the dataset's test split, or None when it cannot load.

        In simulation the server can read the public dataset; in a deployment the
        centre usually holds no images, so a load failure only disables it.
        """
        if not cfg.run.global_eval:
            return None
        try:
            size = decode_size(cfg.data.image_size, cfg.teacher.image_size)
            ds = load_dataset(
                cfg.data.source,
                size,
                cfg.data.cache_dir,
                seed=cfg.train.seed,
                val_fraction=cfg.data.val_fraction,
                test_fraction=cfg.data.test_fraction,
            )
        except FedKDError as err:
            log.warning("global evaluation disabled: %s", err)
            return None
        if list(ds.classes) != list(classes):
            log.warning(
                "global evaluation disabled: server data classes %s differ from "
                "the sites' %s",
                list(ds.classes),
                classes,
            )
            return None
        x = to_student_tensor(ds.test.images, cfg.data.image_size)
        val = None
        if len(ds.val):
            val = (
                to_student_tensor(ds.val.images, cfg.data.image_size),
                torch.from_numpy(ds.val.labels.astype("int64")),
            )
        ev = cls(
            cfg,
            classes,
            x,
            torch.from_numpy(ds.test.labels.astype("int64")),
            ds.channels,
            val,
        )
        ev.test_images = ds.test.images
        return ev

    def _model(self, arrays: ArrayRecord) -> torch.nn.Module:
        model = create_student(self.cfg.student.arch, len(self.classes), self.channels)
        load_into(model, arrays, STUDENT_PREFIX)
        return model

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        """ACC/AUC/loss of the global student on the global test set."""
        return evaluate(self._model(arrays), self.x, self.y)

    def outputs(self, arrays: ArrayRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pooled features, logits, labels) of the student on the global test."""
        feats, logits = student_outputs(self._model(arrays), self.x)
        return feats.double().numpy(), logits.double().numpy(), self.y.numpy()

    def val_logits(self, arrays: ArrayRecord) -> tuple[np.ndarray, np.ndarray] | None:
        """(logits, labels) of the student on the validation split, if held."""
        if self.val is None:
            return None
        _, logits = student_outputs(self._model(arrays), self.val[0])
        return logits.double().numpy(), self.val[1].numpy()

    def evaluate_teacher(self, arrays: ArrayRecord) -> dict[str, float]:
        """The federated teacher head on the global test: `teacher_*` metrics.

        Needs the teacher at the server (simulation): its features of the
        global test images come from the same on-disk cache the sites use.
        Empty when the arrays carry no head (local head, or no teacher).
        """
        if not any(k.startswith(HEAD_PREFIX) for k in arrays.keys()):
            return {}
        if self._teacher_feats is None:
            if self.test_images is None:
                return {}
            from common.distill.features import cached_features
            from common.models.teacher import load_teacher

            tcfg = self.cfg.teacher
            try:
                feats, _ = cached_features(
                    tcfg,
                    self.test_images,
                    1,
                    tcfg.cache_dir,
                    lambda: load_teacher(tcfg),
                )
            except FedKDError as err:
                log.warning("teacher probe on the global test disabled: %s", err)
                self.test_images = None
                return {}
            self._teacher_feats = torch.from_numpy(feats[0])
        head = torch.nn.Linear(self._teacher_feats.shape[1], len(self.classes))
        load_into(head, arrays, HEAD_PREFIX)
        with torch.no_grad():
            t = evaluate_logits(head_logits(head, self._teacher_feats), self.y)
        return {f"teacher_{k}": v for k, v in t.items() if k != "num-examples"}

    def evaluate_val(self, arrays: ArrayRecord) -> dict[str, float]:
        """The same on the validation split: what sweeps choose defaults by."""
        if self.val is None:
            return {}
        return evaluate(self._model(arrays), *self.val)
