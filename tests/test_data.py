"""Datasets and the batch loader: the digits split, user .npz and image folders, errors, exact resume."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import SPECS
from dit_compiler.cli import main
from dit_compiler.app.data import BatchLoader, Dataset, ImageShape, digits, digits_heldout_mask, load_dataset
from dit_compiler.errors import UsageError

GREY8 = ImageShape(channels=1, size=8, num_classes=10)


def test_digits_split_is_fixed_disjoint_and_scaled():
    train, held = digits("train"), digits("heldout")
    assert (len(train), len(held)) == (1442, 355)
    assert train.images.shape == (1442, 1, 8, 8) and train.images.dtype == np.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert set(np.bincount(held.labels)) <= {34, 35, 36}
    from sklearn.datasets import load_digits

    labels = load_digits().target
    mask = digits_heldout_mask(labels)
    assert mask.sum() == 355 and (np.flatnonzero(labels == 3)[4::5] == np.flatnonzero(mask & (labels == 3))).all()
    np.testing.assert_array_equal(digits("heldout").images, held.images)
    assert load_dataset("digits", GREY8).source == "digits (train)"


def test_npz_uint8_and_float_images(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", images=pixels, labels=np.arange(5))
    data = load_dataset(str(tmp_path / "grey.npz"), GREY8)
    assert data.images.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(data.images[:, 0], pixels / 127.5 - 1, atol=1e-6)
    latents = rng.standard_normal((3, 8, 8, 4)).astype(np.float32) * 3
    np.savez(tmp_path / "latents.npz", images=latents, labels=np.array([0, 1, 2]))
    data = load_dataset(str(tmp_path / "latents.npz"), ImageShape(4, 8, 10))
    np.testing.assert_array_equal(data.images, latents.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("images,labels,message", [
    (np.zeros((2, 6, 6), np.uint8), [0, 1], "images are 6x6, the spec's model takes 8x8"),
    (np.zeros((2, 8, 8, 3), np.uint8), [0, 1], "3 channel(s), the spec's model takes 1"),
    (np.zeros((2, 8, 8), np.uint8), [0, 10], "label 10 is out of range; allowed: 0..9"),
    (np.zeros((0, 8, 8), np.uint8), np.zeros(0, int), "no images"),
    (np.zeros((2, 8, 8), np.int32), [0, 1], "images are int32; allowed: uint8"),
    (np.zeros((2, 8, 8), np.uint8), [0], "labels must be 2 integers"),
])
def test_npz_errors_name_the_file(tmp_path, images, labels, message):
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=np.asarray(labels))
    with pytest.raises(UsageError) as error:
        load_dataset(str(path), GREY8)
    assert str(path) in str(error.value) and message in str(error.value)


def test_npz_without_labels(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UsageError, match="no labels array"):
        load_dataset(str(tmp_path / "x.npz"), GREY8)


def _write_folder(root, classes: dict[str, list[np.ndarray]], mode: str = "L"):
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image, mode=mode).save(root / name / f"{i}.png")


def test_image_folder_classes_in_sorted_order(tmp_path):
    rng = np.random.default_rng(1)
    zero, one = (rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(2))
    _write_folder(tmp_path / "data", {"b_one": [one, one], "a_zero": [zero]})
    data = load_dataset(str(tmp_path / "data"), GREY8)
    assert list(data.labels) == [0, 1, 1]
    np.testing.assert_allclose(data.images[0, 0], zero / 127.5 - 1, atol=1e-6)


def test_image_folder_errors(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    _write_folder(tmp_path / "rgb", {"a": [rgb]}, mode="RGB")
    with pytest.raises(UsageError, match="rgb: images have 3 channel"):
        load_dataset(str(tmp_path / "rgb"), GREY8)
    _write_folder(tmp_path / "mixed", {"a": [np.zeros((8, 8), np.uint8)], "b": [np.zeros((6, 6), np.uint8)]})
    with pytest.raises(UsageError, match=r"b/0.png: 6x6 .*unlike the folder's first image"):
        load_dataset(str(tmp_path / "mixed"), GREY8)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match="empty: no images"):
        load_dataset(str(tmp_path / "empty"), GREY8)
    with pytest.raises(UsageError, match="nope: no such dataset"):
        load_dataset(str(tmp_path / "nope"), GREY8)


def _numbered(n: int) -> Dataset:
    return Dataset(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), np.arange(n), "numbers")


def test_loader_full_batches_shuffled_per_epoch_remainder_wraps():
    loader = BatchLoader(_numbered(10), batch=4, seed=0)
    seen = np.concatenate([loader.next() for _ in range(5)])    # 20 images: exactly two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert list(seen[:10]) != list(seen[10:])
    assert loader.state() == {"seed": 0, "epoch": 2, "position": 0}
    small = BatchLoader(_numbered(3), batch=8, seed=0)              # smaller than a batch: still full batches
    assert len(small.next()) == 8


def test_loader_state_restores_the_order_exactly():
    first = BatchLoader(_numbered(10), batch=4, seed=5)
    for _ in range(3):
        first.next()
    state = first.state()
    expected = [first.next() for _ in range(4)]
    second = BatchLoader(_numbered(10), batch=4, seed=5)
    second.load_state(state)
    for want in expected:
        np.testing.assert_array_equal(second.next(), want)


def test_train_cli_rejects_bad_data_before_writing(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    run = tmp_path / "run"
    code = main(["train", str(SPECS / "tiny.yaml"), "--data", str(tmp_path / "bad.npz"), "--out", str(run)])
    assert code == 2 and not run.exists()
    err = capsys.readouterr().err
    assert "bad.npz: images have 1 channel(s), the spec's model takes 4" in err and "Traceback" not in err
