"""Teacher linear head: full-batch fit, warm-started training, logits."""

from __future__ import annotations

import numpy as np
import torch

from common.models.head import fit_head, head_logits, train_head


def _blobs(n: int = 120, dim: int = 16, scale: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = rng.normal(0, 3, (3, dim))
    x = (centers[y] + rng.normal(0, 1, (n, dim))) * scale + 50.0
    return x.astype(np.float32), y


def _acc(head, x, y) -> float:
    return float((head_logits(head, x).argmax(1).numpy() == y).mean())


def test_fit_head_separates_blobs_on_raw_features():
    x, y = _blobs()

    head = fit_head(x, y, num_classes=3, weight_decay=1e-4, seed=0)

    assert head.in_features == 16 and head.out_features == 3
    assert _acc(head, x, y) > 0.95


def test_fit_head_is_deterministic_and_scale_invariant():
    x, y = _blobs()

    a = fit_head(x, y, 3, weight_decay=1e-3, seed=1)
    b = fit_head(x, y, 3, weight_decay=1e-3, seed=1)
    big = fit_head(x * 1000.0, y, 3, weight_decay=1e-3, seed=1)

    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    # standardisation is folded into the weights: predictions ignore the scale
    np.testing.assert_array_equal(
        head_logits(a, x).argmax(1), head_logits(big, x * 1000.0).argmax(1)
    )


def test_train_head_warm_start_is_deterministic_and_improves():
    x, y = _blobs(seed=3)
    start = torch.nn.Linear(16, 3)
    torch.nn.init.zeros_(start.weight)
    torch.nn.init.zeros_(start.bias)
    a, b = torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)
    a.load_state_dict(start.state_dict())
    b.load_state_dict(start.state_dict())

    stats = train_head(a, x, y, epochs=10, lr=0.05, weight_decay=1e-4, seed=7)
    train_head(b, x, y, epochs=10, lr=0.05, weight_decay=1e-4, seed=7)

    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    assert _acc(a, x, y) > 0.9 and stats["head_steps"] == 10 * 2


def test_head_logits_accepts_numpy_and_tensors():
    head = torch.nn.Linear(4, 2)
    x = np.ones((3, 4), np.float32)

    out_np, out_t = head_logits(head, x), head_logits(head, torch.from_numpy(x))

    assert out_np.shape == (3, 2) and not out_np.requires_grad
    torch.testing.assert_close(out_np, out_t)
