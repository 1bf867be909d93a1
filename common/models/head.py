"""The teacher's linear head over frozen features: fit, warm-started training, logits.

`fit_head` and `train_head` standardise the features they are given (this
site's only) to condition the optimisation, then fold the scaling into the
weights, so every head takes raw features and no statistics are kept or shared.
Both are deterministic for a given seed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _as_tensors(
    features: np.ndarray | Tensor, labels: np.ndarray | Tensor
) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(
        np.asarray(features) if not isinstance(features, Tensor) else features
    ).float()
    y = torch.as_tensor(
        np.asarray(labels) if not isinstance(labels, Tensor) else labels
    ).long()
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"head features must be (N, D) and labels (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if len(y) == 0:
        raise ValueError("no labelled features to fit the teacher head on")
    return x, y


def fit_head(
    features: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    seed: int = 0,
    max_iter: int = 200,
) -> nn.Linear:
    """Full-batch L2-regularised logistic regression (L-BFGS) on raw features."""
    x, y = _as_tensors(features, labels)
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise ValueError(f"labels outside [0, {num_classes}) in head fit")
    torch.manual_seed(seed)  # the fit starts from zeros; the seed is for symmetry
    mu = x.mean(0)
    sd = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        # logits = ((x - mu) / sd) @ w.T + b = x @ (w / sd).T + (b - (w / sd) @ mu)
        w_raw = w.detach() / sd
        head.weight.copy_(w_raw)
        head.bias.copy_(b.detach() - w_raw @ mu)
    return head


def train_head(
    head: nn.Linear,
    features: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    epochs: int = 20,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Warm-started mini-batch Adam on `head` in place (federated head rounds)."""
    x, y = _as_tensors(features, labels)
    if int(y.max()) >= head.out_features or int(y.min()) < 0:
        raise ValueError(f"labels outside [0, {head.out_features}) in head training")
    gen = torch.Generator().manual_seed(seed)
    # Train in this site's standardised feature space (a local preconditioner; the
    # statistics never leave the function) and map back to raw-feature weights.
    mu = x.mean(0)
    sd = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sd
    with torch.no_grad():
        w = (head.weight.detach().float() * sd).requires_grad_(True)
        b = (
            head.bias.detach().float() + head.weight.detach().float() @ mu
        ).requires_grad_(True)
    # The L2 penalty is on the standardised weights, as in fit_head.
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=0.0)
    total, steps = 0.0, 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(z[idx] @ w.T + b, y[idx])
                opt.zero_grad(set_to_none=True)
                (loss + 0.5 * weight_decay * w.pow(2).sum()).backward()
                opt.step()
                total += loss.item()
                steps += 1
    with torch.no_grad():
        w_raw = w.detach() / sd
        head.weight.copy_(w_raw)
        head.bias.copy_(b.detach() - w_raw @ mu)
    return {"head_loss": total / max(steps, 1), "head_steps": float(steps)}


def head_logits(head: nn.Linear, features: np.ndarray | Tensor) -> Tensor:
    """Logits (N, K) of `head` on (N, D) features, without gradients."""
    x = (
        features
        if isinstance(features, Tensor)
        else torch.from_numpy(np.asarray(features, dtype=np.float32))
    )
    with torch.no_grad():
        return head(x.float().to(head.weight.device))


__all__ = ["fit_head", "head_logits", "train_head"]
