"""`ditc evaluate`: the shared Frechet distance, the digits classifier, scores and the guidance sweep."""
from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import scipy.linalg

from dit_compiler.cli import main
from dit_compiler.app.data import digits
from dit_compiler.app.evaluate import FewSamplesWarning, digits_classifier, frechet_distance, score_digits
from train_helpers import train_tiny


def _rotation(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def test_frechet_distance_closed_form_on_commuting_gaussians():
    """Covariances Q diag(a) Q^T and Q diag(b) Q^T: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(0)
    q = _rotation(16, 1)
    a, b = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu1, q @ np.diag(a) @ q.T) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_matches_a_scipy_sqrtm_reference():
    rng = np.random.default_rng(2)
    for dim, rank in ((8, 8), (32, 32), (32, 5)):
        x, y = rng.standard_normal((dim, rank)), rng.standard_normal((dim, dim))
        s1, s2 = x @ x.T, y @ y.T / dim + np.eye(dim) * 0.1
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        root = scipy.linalg.sqrtm(s1 @ s2).real
        reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_digits_classifier_is_trained_once_and_cached(classifier):
    clf, trained = digits_classifier(classifier)
    again, trained_again = digits_classifier(classifier)
    assert trained and not trained_again
    assert clf.heldout_accuracy > 0.93 and again.heldout_accuracy == clf.heldout_accuracy
    held = digits("heldout")
    assert np.mean(clf.predict(held.images) == held.labels) == pytest.approx(clf.heldout_accuracy)
    np.testing.assert_allclose(again.features(held.images), clf.features(held.images))
    assert clf.features(held.images).shape == (355, 64)


def test_scores_separate_real_digits_from_noise(classifier):
    clf, _ = digits_classifier(classifier)
    train = digits("train")
    pick = np.random.default_rng(1).choice(len(train), 300, replace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewSamplesWarning)   # 300 samples for 64 features: no warning
        real = score_digits(clf, train.images[pick], train.labels[pick])
    noise = score_digits(clf, np.random.default_rng(0).uniform(-1, 1, (300, 1, 8, 8)), train.labels[:300])
    assert real["accuracy"] > 0.97 and real["fd_digits"] < 2 * real["floor"]
    assert noise["accuracy"] < 0.3 and noise["fd_digits"] > 10 * noise["floor"]
    assert real["floor"] == noise["floor"] and real["n"] == 300


def test_evaluate_command_sweeps_guidance_and_scores_a_samples_file(classifier, tmp_path, capsys):
    run = train_tiny(tmp_path, steps=2)
    out = tmp_path / "eval"
    with pytest.warns(FewSamplesWarning, match="12 samples for 64 features: FD-digits .and its floor. is unreliable"):
        assert main(["evaluate", str(run), "--cfg", "1,3", "--n", "12", "--steps", "2", "--cache", str(classifier),
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and "FD-digits" in text
    rows = list(csv.DictReader((out / "evaluate.csv").open()))
    assert [float(r["cfg"]) for r in rows] == [1.0, 3.0] and all(int(r["n"]) == 12 for r in rows)
    assert (out / "evaluate.png").is_file() and (out / "cfg3" / "grid.png").is_file()
    with pytest.warns(FewSamplesWarning):
        assert main(["evaluate", str(out / "cfg3"), "--cache", str(classifier)]) == 0
    assert list(csv.DictReader((out / "cfg3" / "evaluate.csv").open()))[0]["fd_digits"] == rows[1]["fd_digits"]
    assert json.loads((out / "cfg3" / "evaluate.json").read_text())[0]["cfg"] == 3   # from its settings.json


def test_fid_with_user_inception_weights(tmp_path, capsys):
    """Random weights saved in pytorch-fid's layout (1008 classes): the loading and feature code is real."""
    import torch

    from dit_compiler.app.inception import InceptionFeatures

    torch.manual_seed(0)
    network = InceptionFeatures(fid=True)
    for conv in (m for m in network.modules() if isinstance(m, torch.nn.Conv2d)):
        torch.nn.init.kaiming_normal_(conv.weight)           # activations keep their scale through 90 layers
    state = network.state_dict() | {"fc.weight": torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)}
    torch.save(state, tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ref = tmp_path / "ref"
    ref.mkdir()
    from PIL import Image

    for i, image in enumerate(images):
        Image.fromarray(image).save(ref / f"{i}.png")
    other = tmp_path / "other.npz"
    np.savez(other, images=rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32), labels=np.zeros(2, int))
    flags = ["--inception", str(tmp_path / "inception.pth"), "--ref", str(ref)]
    with pytest.warns(FewSamplesWarning, match="2 samples for 2048 features: FID is unreliable"):
        assert main(["evaluate", str(other), "--out", str(tmp_path / "other")] + flags) == 0
    fid = float(next(csv.DictReader((tmp_path / "other" / "evaluate.csv").open()))["fid"])
    assert "FID against" in capsys.readouterr().out and 0 < fid < np.inf
    assert main(["evaluate", str(other), "--inception", str(other), "--ref", str(ref)]) == 2
    assert main(["evaluate", str(other), "--inception", str(tmp_path / "inception.pth")]) == 2
    assert "--inception needs --ref" in capsys.readouterr().err


@pytest.mark.parametrize("images,labels,says", [
    (np.full((2, 1, 8, 8), np.nan, np.float32), [1, 2], "finite floats"),
    (np.zeros((1, 1, 8, 8), np.float32), [1], "N at least 2"),
    (np.zeros((2, 1, 8, 8), np.float32), [50, -3], "integers from 0 to 9"),
    (np.zeros((2, 1, 8, 8), np.float32), [1.5, 2.0], "integers from 0 to 9"),
])
def test_a_samples_file_that_cannot_be_scored_is_refused(tmp_path, capsys, images, labels, says):
    np.savez(tmp_path / "s.npz", images=images, labels=np.array(labels))
    assert main(["evaluate", str(tmp_path / "s.npz"), "--out", str(tmp_path / "e")]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "e").exists()
