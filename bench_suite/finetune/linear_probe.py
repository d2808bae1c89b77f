"""Linear-probe recipe: logistic regression on frozen, L2-normalised features of the selected samples.

Fast, exact and seeded: the cpu profile's first evaluation recipe. The selected ids index the training
FeatureStore; the test FeatureStore is the held-out split. Returns top-1 and per-class accuracy.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from bench_suite.errors import BadInputError


def linear_probe(train_store, selected_ids, test_store, *, seed: int, C: float = 1.0, max_iter: int = 1000,
                 labels=None, **_unused) -> dict:
    """Fit on the selected samples' features and labels; evaluate on the whole test store."""
    selected_ids = np.asarray(selected_ids, dtype=np.int64)
    if len(selected_ids) == 0:
        raise BadInputError("empty selection: nothing to train the probe on")
    rows = train_store.rows_of_ids(selected_ids)
    x = train_store.take(np.sort(rows))
    y = np.asarray(train_store.labels if labels is None else labels)[np.sort(rows)]
    if test_store.labels is None:
        raise BadInputError("the test feature store has no labels")
    x_test = np.asarray(test_store.features, dtype=np.float32)
    y_test = np.asarray(test_store.labels)
    t0 = time.perf_counter()
    classes = np.unique(y)
    if len(classes) == 1:  # a one-class selection can only predict that class
        pred = np.full_like(y_test, classes[0])
    else:
        from sklearn.exceptions import ConvergenceWarning  # ~1.5 s to import: only where it is used
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x, y)
        pred = clf.predict(x_test)
    correct = pred == y_test
    n_cls = int(max(y_test.max(), y.max()) + 1)
    per_class = [float(correct[y_test == c].mean() * 100) if (y_test == c).any() else None for c in range(n_cls)]
    return {"top1": float(correct.mean() * 100), "per_class": per_class, "n_train": int(len(rows)),
            "classes_seen": int(len(classes)), "seconds": time.perf_counter() - t0, "recipe": "linear_probe",
            "C": C, "seed": seed}
