"""`ditc evaluate`: how good are generated digits, measured against the held-out real digits.

A small classifier of real digits (scikit-learn's MLP, trained on the training split only, cached on
disk) gives (a) the accuracy of samples against the labels they were generated for, (b) FD-digits: the
Frechet distance between the classifier's penultimate features (its last hidden layer, 64 ReLU units)
of the samples and of the held-out digits, and (c) the real-vs-real floor: the same distance between
as many real training images as there are samples (at most the 1,442 of the split, drawn with the
evaluation seed) and the same held-out digits. Equal sample counts make the floor the distance a
generator that reproduced the training distribution exactly would get. Samples are clipped to
[-1, 1] first, as a saved image would be. One function, `frechet_distance`, computes every such distance.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_compiler.app.data import digits, load_images
from dit_compiler.errors import UsageError
from dit_compiler.files import cache_root, write_atomic, write_text_atomic
from dit_compiler.userfiles import load_npz

HIDDEN = (128, 64)
#: The kinds of folder `ditc evaluate` writes into: its own, or the samples folder it scores.
EVALUATE = ("evaluate", "samples")
DIGIT_SHAPE = (1, 8, 8)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
    symmetric positive semi-definite matrix: two symmetric eigendecompositions instead of the general
    (complex, sometimes unstable) matrix square root; rank-deficient covariances need no offset.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FewSamplesWarning(UserWarning):
    """A Frechet distance of fewer samples than features: their covariance is singular."""


def warn_if_few(samples: int, features: int, score: str) -> None:
    """Warn where `score`, a Frechet distance, comes from fewer samples than features: their covariance is
    then rank-deficient, and the distance moves with the sample count (n=50 for 64 features: a floor of 14.5,
    FD/floor 0.67), not with the samples' quality alone."""
    if samples < features:
        warnings.warn(f"{samples} samples for {features} features: {score} is unreliable (the covariance of fewer "
                      f"samples than features is singular); score at least {features} samples", FewSamplesWarning,
                      stacklevel=2)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def features_distance(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


@dataclass(frozen=True)
class DigitsClassifier:
    """An MLP over the 64 pixels; `features` is its last hidden layer."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    heldout_accuracy: float

    def features(self, images: np.ndarray) -> np.ndarray:
        h = np.clip(np.asarray(images, np.float64), -1, 1).reshape(len(images), -1)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = np.maximum(h @ w + b, 0)
        return h

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.argmax(self.features(images) @ self.weights[-1] + self.biases[-1], axis=1)


def digits_classifier(cache_dir: Path) -> tuple[DigitsClassifier, bool]:
    """The cached classifier, trained first when the cache lacks it; returns it and whether it was trained."""
    import sklearn

    path = Path(cache_dir) / f"digits-classifier-{'x'.join(map(str, HIDDEN))}-sklearn{sklearn.__version__}.npz"
    if os.path.lexists(path):
        try:
            return _cached_classifier(path), False
        except UsageError as error:   # a cache is ditc's own: one it cannot read is made again
            warnings.warn(f"{error}; training the classifier again", CacheWarning, stacklevel=2)
    from sklearn.neural_network import MLPClassifier

    train, held = digits("train"), digits("heldout")
    mlp = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=1000, random_state=0)
    mlp.fit(train.images.reshape(len(train), -1), train.labels)
    accuracy = float(mlp.score(held.images.reshape(len(held), -1), held.labels))
    clf = DigitsClassifier(tuple(mlp.coefs_), tuple(mlp.intercepts_), accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda file: np.savez(file, heldout_accuracy=accuracy,
                                             **{f"w{i}": w for i, w in enumerate(clf.weights)},
                                             **{f"b{i}": b for i, b in enumerate(clf.biases)}))
    return clf, True


class CacheWarning(UserWarning):
    """A cached file ditc could not use and makes again."""


def _cached_classifier(path: Path) -> DigitsClassifier:
    """The classifier in the cache file `path`, refused (UsageError) unless its layers have the shapes of
    HIDDEN's and hold finite numbers."""
    layers = len(HIDDEN) + 1
    names = (*(f"w{i}" for i in range(layers)), *(f"b{i}" for i in range(layers)), "heldout_accuracy")
    arrays = load_npz(path, names, "cached digits classifier")
    sizes = (int(np.prod(DIGIT_SHAPE)), *HIDDEN, 10)
    for i in range(layers):
        w, b = arrays[f"w{i}"], arrays[f"b{i}"]
        if w.shape != sizes[i:i + 2] or b.shape != sizes[i + 1:i + 2] or w.dtype.kind != "f" or b.dtype.kind != "f" \
                or not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise UsageError(f"{path}: layer {i} of the cached digits classifier is not a finite {sizes[i]}x"
                             f"{sizes[i + 1]} layer")
    accuracy = arrays["heldout_accuracy"]
    if accuracy.shape != () or accuracy.dtype.kind != "f" or not 0 <= float(accuracy) <= 1:
        raise UsageError(f"{path}: the cached digits classifier's accuracy is not a number from 0 to 1")
    return DigitsClassifier(tuple(arrays[f"w{i}"] for i in range(layers)),
                            tuple(arrays[f"b{i}"] for i in range(layers)), float(accuracy))


def score_digits(clf: DigitsClassifier, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """accuracy, fd_digits, floor and their ratio for samples generated for `labels`."""
    if tuple(images.shape[1:]) != DIGIT_SHAPE:
        raise UsageError(f"FD-digits scores 1x8x8 digits; these samples are {'x'.join(map(str, images.shape[1:]))} "
                         "(for other images pass --inception FILE --ref PATH)")
    train, held = digits("train"), digits("heldout")
    held_features = clf.features(held.images)
    warn_if_few(len(images), held_features.shape[1], "FD-digits (and its floor)")
    real = np.random.default_rng(seed).choice(len(train), min(len(images), len(train)), replace=False)
    fd = features_distance(clf.features(images), held_features)
    floor = features_distance(clf.features(train.images[real]), held_features)
    return {"n": len(images), "accuracy": float(np.mean(clf.predict(images) == labels)), "fd_digits": fd,
            "floor": floor, "fd_over_floor": fd / floor}


def make_scorer(inception: Path | None, ref: str | None, cache: Path | None, seed: int = 0,
                say: Callable[[str], None] = print) -> Callable[[np.ndarray, np.ndarray], dict]:
    """A function (images, labels) -> scores: FID against the reference images `ref` with the Inception
    weights `inception`, else the digits scores (the classifier cached in `cache`, default ditc's cache)."""
    if inception:
        from dit_compiler.app.inception import inception_features, load_inception

        model = load_inception(Path(inception))
        reference = inception_features(model, load_images(ref))
        say(f"FID against {ref} ({len(reference)} images), Inception weights {inception}")

        def fid(images, labels) -> dict:
            features = inception_features(model, images)
            warn_if_few(min(len(features), len(reference)), features.shape[1], "FID")
            return {"n": len(images), "fid": features_distance(features, reference)}
        return fid

    clf, trained = digits_classifier(cache or cache_root())
    say(f"digits classifier ({'trained now' if trained else 'cached'}): held-out accuracy "
        f"{100 * clf.heldout_accuracy:.1f}%")
    return lambda images, labels: score_digits(clf, images, labels, seed)


#: Table columns: key, header, format.
COLUMNS = (("cfg", "cfg", "{:g}"), ("n", "n", "{:d}"), ("accuracy", "accuracy", "{:.1%}"),
           ("fd_digits", "FD-digits", "{:.3f}"), ("floor", "floor", "{:.3f}"), ("fd_over_floor", "FD/floor", "{:.2f}"),
           ("fid", "FID", "{:.3f}"), ("sampling_s", "sampling s", "{:.1f}"))


def format_table(rows: list[dict]) -> str:
    shown = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[header for _, header, _ in shown]]
    cells += [["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in shown] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(shown))]
    return "\n".join(" ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells)


def write_table(rows: list[dict], out_dir: Path) -> None:
    """evaluate.csv and evaluate.json; with several guidance scales, evaluate.png (scores vs cfg)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "evaluate.csv", table.getvalue(), EVALUATE)
    write_text_atomic(out_dir / "evaluate.json", json.dumps(rows, indent=1) + "\n", EVALUATE)
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["cfg"])
    cfg = [r["cfg"] for r in rows]
    digits_scores = "accuracy" in rows[0]
    fig, axes = plt.subplots(1, 2 if digits_scores else 1, figsize=(9 if digits_scores else 5, 3.6), squeeze=False)
    right = axes[0, -1]
    if digits_scores:
        axes[0, 0].plot(cfg, [100 * r["accuracy"] for r in rows], "o-")
        axes[0, 0].set(xlabel="guidance scale", ylabel="classifier accuracy (%)")
        right.plot(cfg, [r["fd_digits"] for r in rows], "o-", label="samples vs held-out")
        right.plot(cfg, [r["floor"] for r in rows], "--", label="real vs held-out (floor)")
        right.set(xlabel="guidance scale", ylabel="FD-digits")
        right.legend()
    else:
        right.plot(cfg, [r["fid"] for r in rows], "o-")
        right.set(xlabel="guidance scale", ylabel="FID")
    fig.tight_layout()
    write_atomic(out_dir / "evaluate.png", lambda file: fig.savefig(file, format="png", dpi=120), EVALUATE)
    plt.close(fig)
