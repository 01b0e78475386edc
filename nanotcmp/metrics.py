"""
The paper's metrics, numpy only. Emotion: WA (accuracy), AA (mean per-class recall), macro F1
and the weighted F1 that the ERC literature reports (each class's F1 weighted by its share of the
true labels), all from one confusion matrix. Pre-training: R_k@m of target utterance searching.
Every score is in percent (0-100). Inputs may be lists, numpy arrays or torch tensors.
"""

import numpy as np


def _array(x):
    if hasattr(x, "detach"):  # a torch tensor, maybe on the GPU or needing grad: np.asarray refuses those
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(y, n_classes, name):
    y = _array(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size == 0:
        return y.astype(np.int64)  # np.asarray([]) is float64
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise ValueError(f"{name} holds label {bad[0]}, outside 0..{n_classes - 1}")
    return y.astype(np.int64)


def confusion(y_true, y_pred, n_classes):
    """(n_classes, n_classes) counts; row = true class, column = predicted class."""
    t, p = _labels(y_true, n_classes, "y_true"), _labels(y_pred, n_classes, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    if len(t) == 0:
        raise ValueError("no samples: every metric would be 0/0")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _wa(cm):
    return 100.0 * float(np.trace(cm) / cm.sum())


def _aa(cm):
    # a class absent from y_true has recall 0/0, undefined rather than 0, so it is left out of the mean
    support = cm.sum(1)
    present = support > 0
    return 100.0 * float(np.mean(np.diag(cm)[present] / support[present]))


def _f1s(cm):
    # each class's F1 = 2PR/(P+R) = 2tp / (2tp + fp + fn), which is 0 (not 0/0) whenever the class
    # was true or predicted but never both -> (F1 of each class, whether it was true or predicted)
    denom = cm.sum(0) + cm.sum(1)  # = 2tp + fp + fn
    return 2 * np.diag(cm) / np.maximum(denom, 1), denom > 0


def _f1(cm):
    # the classes neither true nor predicted are left out, as in scikit-learn's
    # f1_score(average="macro", labels=<the classes seen>)
    f1, seen = _f1s(cm)
    return 100.0 * float(np.mean(f1[seen]))


def _wf1(cm):
    # scikit-learn's f1_score(average="weighted"): each class's F1 weighted by its support
    support = cm.sum(1)
    return 100.0 * float(_f1s(cm)[0] @ support / support.sum())


def emotion_scores(y_true, y_pred, n_classes):
    """-> WA, AA, macro F1 ("f1"), weighted F1 ("wf1"), in percent, and the confusion matrix"""
    cm = confusion(y_true, y_pred, n_classes)
    return {"wa": _wa(cm), "aa": _aa(cm), "f1": _f1(cm), "wf1": _wf1(cm), "confusion": cm.tolist()}


def class_scores(cm):
    """A confusion matrix (rows true) -> each class's precision, recall and F1 in percent, None
    where 0/0 (a class never predicted has no precision, one never true no recall), and its support"""
    cm = np.asarray(cm)
    tp, predicted, true = np.diag(cm), cm.sum(0), cm.sum(1)
    f1, seen = _f1s(cm)

    def share(a, b):
        return [100.0 * float(x / y) if y else None for x, y in zip(a, b)]
    return {"precision": share(tp, predicted), "recall": share(tp, true),
            "f1": [100.0 * float(v) if s else None for v, s in zip(f1, seen)], "support": true.tolist()}


def majority_class(y_train, n_classes):
    """y_train's most frequent class (ties: lowest index)"""
    return int(np.argmax(np.bincount(_labels(y_train, n_classes, "y_train"), minlength=n_classes)))


def majority_scores(y_train, y_test, n_classes):
    """The floor any model must beat: always predict y_train's most frequent class."""
    y_test = _labels(y_test, n_classes, "y_test")
    return emotion_scores(y_test, np.full_like(y_test, majority_class(y_train, n_classes)), n_classes)


def last_emotion_scores(y_train, y_test, last, n_classes):
    """Inertia: predict for each sample the emotion its target speaker last showed in the context,
    last (-1 where the context has none: then y_train's most frequent class). It reads labels of
    the context that a model never sees, so it is a reference, not a baseline of the same task."""
    last = _array(last)
    return emotion_scores(y_test, np.where(last >= 0, last, majority_class(y_train, n_classes)), n_classes)


def recall_at(scores, true_index, m):
    """
    R_k@m (Eq. 24): the share of targets, in percent, whose true candidate is among the m
    best-scored of its row's k candidates. Ties are pessimistic: the true candidate ranks below
    every candidate with an equal score, so a model that scores everything alike gets R_k@m = 0
    for every m < k instead of a lucky hit from the sort order.
    """
    s, i = _array(scores).astype(np.float64), _array(true_index)
    if s.ndim != 2 or s.shape[0] == 0 or i.shape != (s.shape[0],):
        raise ValueError(f"need scores (N, k) with N > 0 and true_index (N,), got {s.shape} and {i.shape}")
    n, k = s.shape
    if not 1 <= m <= k:
        raise ValueError(f"m={m} must be in 1..k={k}")
    if not np.issubdtype(i.dtype, np.integer) or i.min() < 0 or i.max() >= k:
        raise ValueError(f"true_index must be integers in 0..{k - 1}, got {i.min()}..{i.max()}")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN, which no ranking can place")
    true = s[np.arange(n), i][:, None]
    at_or_above = (s >= true).sum(1)  # the true candidate's 1-based rank, losing every tie
    return 100.0 * float(np.mean(at_or_above <= m))
