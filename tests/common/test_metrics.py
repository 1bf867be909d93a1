"""ACC/AUC with MedMNIST semantics."""

import math

import numpy as np
import pytest

from common.metrics import accuracy, auc, summarize


def test_accuracy_and_binary_auc_by_hand():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    assert accuracy(y, probs) == 0.5
    # pairs (pos, neg): (0.4,0.1)+ (0.4,0.6)- (0.9,0.1)+ (0.9,0.6)+ -> 3/4
    assert auc(y, probs) == 0.75


def test_multiclass_auc_is_unweighted_mean_one_vs_rest():
    # Overlapping scores and unequal class sizes (3, 2, 2), so the macro mean,
    # the prevalence-weighted mean and a perfect 1.0 all differ.
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    probs = np.array([
        [0.6, 0.3, 0.1],
        [0.5, 0.2, 0.3],
        [0.2, 0.3, 0.5],
        [0.3, 0.4, 0.3],
        [0.1, 0.6, 0.3],
        [0.4, 0.4, 0.2],
        [0.9, 0.05, 0.05],
    ])
    # one-vs-rest, counting (positive, negative) pairs ranked right:
    #   class 0: pos 0.6, 0.3, 0.9 vs neg 0.5, 0.2, 0.1, 0.4 -> (4+2+4)/12 = 5/6
    #   class 1: pos 0.2, 0.6 vs neg 0.3, 0.3, 0.4, 0.4, 0.05 -> (1+5)/10 = 3/5
    #   class 2: pos 0.5, 0.2 vs neg 0.1, 0.3, 0.3, 0.3, 0.05 -> (5+2)/10 = 7/10
    macro = (5 / 6 + 3 / 5 + 7 / 10) / 3  # = 32/45
    weighted = (3 * 5 / 6 + 2 * 3 / 5 + 2 * 7 / 10) / 7

    got = auc(y, probs)

    assert got == pytest.approx(32 / 45) == pytest.approx(macro)
    assert abs(got - weighted) > 0.01
    # arg-max: rows 0, 2, 4, 6 right; row 5 ties 0.4/0.4 -> class 0 (wrong)
    assert accuracy(y, probs) == pytest.approx(4 / 7)


def test_auc_undefined_on_one_class():
    y = np.zeros(5, dtype=int)
    probs = np.full((5, 2), 0.5)
    assert math.isnan(auc(y, probs))
    assert summarize(y, probs, 0.3)["num-examples"] == 5.0


@pytest.mark.parametrize("seed", range(5))
def test_own_roc_auc_matches_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score as sk_auc

    from common.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 7, 200) / 7.0  # many ties

    assert roc_auc_score(labels, scores) == pytest.approx(
        sk_auc(labels, scores), abs=1e-12
    )


def test_metrics_module_does_not_import_sklearn():
    import subprocess
    import sys

    code = "import common.metrics, sys; print('sklearn' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert out.stdout.strip() == "False"
