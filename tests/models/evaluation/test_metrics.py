"""Metrics against hand-computed values, and the confusion plot outputs."""
import numpy as np
import pytest

from features.errors import ConfigError
from models.training.train_config import CLASSES
from models.evaluation.metrics import compute_metrics
from models.evaluation.plots import confusion_rows, plot_confusion


def _onehot(pred):
    probs = np.full((len(pred), len(CLASSES)), 0.02)
    probs[np.arange(len(pred)), pred] = 0.9
    return probs


# true:  neutral x3, angry x2, happy x1
# pred:  neutral, neutral, angry | angry, angry | neutral
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 0])


def test_metrics_match_hand_computation():
    m = compute_metrics(Y_TRUE, _onehot(Y_PRED))
    # neutral: tp 2, fp 1, fn 1 -> P 2/3, R 2/3, F1 2/3
    # angry:   tp 2, fp 1, fn 0 -> P 2/3, R 1,   F1 0.8
    # happy:   tp 0             -> F1 0
    assert m["accuracy"] == round(4 / 6, 4)
    assert m["per_class_f1"] == {"neutral": 0.6667, "angry": 0.8, "happy": 0.0,
                                 "sad": 0.0, "worried": 0.0, "surprise": 0.0}
    assert m["weighted_f1"] == round((3 * 2 / 3 + 2 * 0.8 + 1 * 0) / 6, 4)
    assert m["macro_f1"] == round((2 / 3 + 0.8 + 0) / 3, 4)  # classes seen in labels/predictions
    assert m["support"] == {"neutral": 3, "angry": 2, "happy": 1, "sad": 0, "worried": 0,
                            "surprise": 0}
    assert m["confusion"][0][:3] == [2, 1, 0]
    assert m["confusion"][1][:3] == [0, 2, 0]
    assert m["confusion"][2][:3] == [1, 0, 0]
    assert np.asarray(m["confusion"]).shape == (6, 6) and np.asarray(m["confusion"]).sum() == 6


def test_metrics_reject_wrong_probability_shape():
    with pytest.raises(ConfigError, match="probs"):
        compute_metrics(Y_TRUE, np.zeros((6, 4)))


def test_confusion_plot_writes_png(tmp_path):
    conf = compute_metrics(Y_TRUE, _onehot(Y_PRED))["confusion"]
    path = plot_confusion(conf, tmp_path / "plots" / "confusion.png", "attention (oof)")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_confusion_rows_for_dvc_template():
    rows = confusion_rows(Y_TRUE, Y_PRED)
    assert len(rows) == 6
    assert rows[2] == {"actual": "neutral", "predicted": "angry"}
    assert rows[5] == {"actual": "happy", "predicted": "neutral"}


@pytest.mark.parametrize("seed", range(20))
def test_metrics_equal_sklearn(seed):
    """The numpy metrics give sklearn's numbers, including classes missing from labels or
    predictions (sklearn's default label set for weighted/macro, zero_division=0)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(seed)
    n, present = int(rng.integers(5, 60)), rng.choice(6, size=int(rng.integers(1, 7)), replace=False)
    y_true = rng.choice(present, size=n)
    y_pred = rng.choice(rng.choice(6, size=int(rng.integers(1, 7)), replace=False), size=n)
    m = compute_metrics(y_true, _onehot(y_pred))
    r = lambda x: round(float(x), 4)  # noqa: E731
    assert m["weighted_f1"] == r(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    assert m["macro_f1"] == r(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["accuracy"] == r(accuracy_score(y_true, y_pred))
    per = f1_score(y_true, y_pred, labels=list(range(6)), average=None, zero_division=0)
    assert list(m["per_class_f1"].values()) == [r(f) for f in per]
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=list(range(6))).tolist()
