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
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dit_compiler.build import write_text_atomic
from dit_compiler.data import digits
from dit_compiler.errors import UsageError

HIDDEN = (128, 64)
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


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ditc"


def digits_classifier(cache_dir: Path) -> tuple[DigitsClassifier, bool]:
    """The cached classifier, trained first when the cache lacks it; returns it and whether it was trained."""
    import sklearn

    path = Path(cache_dir) / f"digits-classifier-{'x'.join(map(str, HIDDEN))}-sklearn{sklearn.__version__}.npz"
    if path.is_file():
        with np.load(path) as f:
            layers = len(HIDDEN) + 1
            return DigitsClassifier(tuple(f[f"w{i}"] for i in range(layers)), tuple(f[f"b{i}"] for i in range(layers)),
                                    float(f["heldout_accuracy"])), False
    from sklearn.neural_network import MLPClassifier

    train, held = digits("train"), digits("heldout")
    mlp = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=1000, random_state=0)
    mlp.fit(train.images.reshape(len(train), -1), train.labels)
    accuracy = float(mlp.score(held.images.reshape(len(held), -1), held.labels))
    clf = DigitsClassifier(tuple(mlp.coefs_), tuple(mlp.intercepts_), accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, heldout_accuracy=accuracy, **{f"w{i}": w for i, w in enumerate(clf.weights)},
             **{f"b{i}": b for i, b in enumerate(clf.biases)})
    tmp.replace(path)
    return clf, True


@dataclass(frozen=True)
class DigitsScores:
    n: int
    accuracy: float     # of the samples against their requested labels
    fd_digits: float    # samples vs held-out digits
    floor: float        # as many real training digits vs held-out digits

    @property
    def ratio(self) -> float:
        return self.fd_digits / self.floor


def score_digits(clf: DigitsClassifier, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> DigitsScores:
    if tuple(images.shape[1:]) != DIGIT_SHAPE:
        raise UsageError(f"FD-digits scores 1x8x8 digits; these samples are {'x'.join(map(str, images.shape[1:]))}")
    train, held = digits("train"), digits("heldout")
    held_features = clf.features(held.images)
    real = np.random.default_rng(seed).choice(len(train), min(len(images), len(train)), replace=False)
    return DigitsScores(
        n=len(images),
        accuracy=float(np.mean(clf.predict(images) == labels)),
        fd_digits=features_distance(clf.features(images), held_features),
        floor=features_distance(clf.features(train.images[real]), held_features),
    )


def write_table(rows: list[dict], out_dir: Path) -> None:
    """evaluate.csv and evaluate.json; with several guidance scales, evaluate.png (accuracy and FD vs cfg)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".evaluate.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_dir / "evaluate.csv")
    write_text_atomic(out_dir / "evaluate.json", json.dumps(rows, indent=1) + "\n")
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = [r["cfg"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(cfg, [100 * r["accuracy"] for r in rows], "o-")
    left.set(xlabel="guidance scale", ylabel="classifier accuracy (%)")
    right.plot(cfg, [r["fd_digits"] for r in rows], "o-", label="samples vs held-out")
    right.plot(cfg, [r["floor"] for r in rows], "--", label="real vs held-out (floor)")
    right.set(xlabel="guidance scale", ylabel="FD-digits")
    right.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "evaluate.png", dpi=120)
    plt.close(fig)


def scores_row(cfg: float | None, scores: DigitsScores, extra: dict) -> dict:
    return {"cfg": cfg} | asdict(scores) | {"fd_over_floor": scores.ratio} | extra


def format_table(rows: list[dict]) -> str:
    lines = [f"{'cfg':>5} {'n':>6} {'accuracy':>9} {'FD-digits':>10} {'floor':>8} {'FD/floor':>9}"]
    for r in rows:
        cfg = "-" if r["cfg"] is None else f"{r['cfg']:g}"
        lines.append(f"{cfg:>5} {r['n']:>6} {100 * r['accuracy']:>8.1f}% {r['fd_digits']:>10.3f} "
                     f"{r['floor']:>8.3f} {r['fd_over_floor']:>9.2f}")
    return "\n".join(lines)
