"""ACC/AUC with MedMNIST semantics."""

import math

import numpy as np

from common.metrics import accuracy, auc, summarize


def test_accuracy_and_binary_auc_by_hand():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    assert accuracy(y, probs) == 0.5
    # pairs (pos, neg): (0.4,0.1)+ (0.4,0.6)- (0.9,0.1)+ (0.9,0.6)+ -> 3/4
    assert auc(y, probs) == 0.75


def test_multiclass_auc_is_mean_one_vs_rest():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert auc(y, probs) == 1.0


def test_auc_undefined_on_one_class():
    y = np.zeros(5, dtype=int)
    probs = np.full((5, 2), 0.5)
    assert math.isnan(auc(y, probs))
    assert summarize(y, probs, 0.3)["num-examples"] == 5.0
