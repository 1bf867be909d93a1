"""Knowledge-distillation losses: small pure functions over logits and features.

Averaging (per-item, then over the whole batch): every item i contributes

    labelled i:    alpha * CE_i + (1 - alpha) * T^2 * KL_i
    unlabelled i:  unlabelled_weight * T^2 * KL_i          (no CE: its label is unused)

and `loss` is the sum of these contributions divided by the batch size N (not by
the number of labelled items), so unlabelled items weigh in proportion to their
share of the batch. KL_i = KL(softmax(t_i / T) || softmax(s_i / T)), so with all
items labelled the KD term is the usual `batchmean` KL times T^2 (Hinton et al.).

The reported terms are ce = sum_{labelled} CE_i / N and kd = T^2 * sum_{all} KL_i / N
(unweighted), so that loss = alpha * ce + (1 - alpha) * kd when every item is
labelled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _kl_per_item(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> Tensor:
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)


def _check_kd_where(kd_where: str) -> None:
    if kd_where not in ("all", "agree"):
        raise ValueError(f"kd_where={kd_where!r}; use all or agree")


def _labelled_kd_mask(
    labelled: Tensor, teacher_logits: Tensor, labels: Tensor, kd_where: str
) -> Tensor:
    """The labelled items that get the KD term (under "agree": where the
    teacher's top class is the label; elsewhere the label wins)."""
    if kd_where != "agree":
        return labelled
    return labelled & (teacher_logits.argmax(dim=1).to(labelled.device) == labels)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    labelled: Tensor | None = None,
    unlabelled_weight: float = 1.0,
    ce_offset: Tensor | None = None,
    kd_where: str = "all",
) -> dict[str, Tensor]:
    """Hard-label CE on labelled items plus T^2-scaled KL to the teacher.

    `ce_offset` (K,) is added to the student's logits in the CE term only
    (logit adjustment by a label prior); the KD term sees the raw logits.
    `kd_where="agree"` keeps the (1 - alpha) KD term of a labelled item only
    where the teacher's top class is its label (soft targets that contradict
    the label are dropped; unlabelled items keep theirs, having no label to
    check against); `"all"` keeps every item's.
    """
    _check_kd_where(kd_where)
    n = student_logits.shape[0]
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}; must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; must be > 0")
    if labelled is None:
        mask = torch.ones(n, dtype=torch.bool, device=student_logits.device)
    else:
        mask = labelled.to(device=student_logits.device, dtype=torch.bool).reshape(n)
    all_labelled = bool(mask.all())
    # Unlabelled items may carry any placeholder label (e.g. -1); never index by it.
    safe_labels = torch.where(mask, labels.to(student_logits.device), 0)
    ce_logits = student_logits.float()
    if ce_offset is not None:
        ce_logits = ce_logits + ce_offset.to(ce_logits.device).reshape(1, -1)
    ce_items = F.cross_entropy(ce_logits, safe_labels, reduction="none")
    ce = (ce_items * mask).sum() / max(n, 1)
    need_teacher = alpha < 1.0 or (not all_labelled and unlabelled_weight > 0)
    if teacher_logits is None:
        if need_teacher:
            raise ValueError(
                "teacher_logits=None needs alpha=1 and every item labelled "
                "(or unlabelled_weight=0)"
            )
        zero = ce.new_zeros(())
        return {"loss": ce, "ce": ce, "kd": zero}
    t2 = float(temperature) ** 2
    kl_items = _kl_per_item(student_logits, teacher_logits.detach(), temperature)
    kd = t2 * kl_items.sum() / max(n, 1)
    loss = alpha * ce if alpha < 1.0 else ce  # alpha=1: exactly CE on labelled items
    if alpha < 1.0:
        kd_mask = _labelled_kd_mask(mask, teacher_logits, safe_labels, kd_where)
        loss = loss + (1.0 - alpha) * t2 * (kl_items * kd_mask).sum() / max(n, 1)
    if not all_labelled and unlabelled_weight > 0:
        loss = loss + unlabelled_weight * t2 * (kl_items * ~mask).sum() / max(n, 1)
    return {"loss": loss, "ce": ce, "kd": kd}


def feature_loss(
    student_proj: Tensor, teacher_features: Tensor, kind: str = "cosine"
) -> Tensor:
    """Feature-matching loss: mean(1 - cosine) or MSE; zero when the two match."""
    if student_proj.shape != teacher_features.shape:
        raise ValueError(
            f"feature shapes differ: student {tuple(student_proj.shape)} vs teacher "
            f"{tuple(teacher_features.shape)}; project the student to the teacher dim"
        )
    s, t = student_proj.float(), teacher_features.float().detach()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"feature loss kind={kind!r}; use cosine or mse")


__all__ = ["feature_loss", "kd_loss"]
