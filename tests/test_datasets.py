"""Dataset readers on files in the official formats, offline datasets, preprocessing, balancing."""

from __future__ import annotations

import numpy as np
import pytest

from nws.data import (
    OFFLINE_DATASETS,
    BalancedSampler,
    load_images,
    readers,
    resolve_datasets,
    split_for_net,
    to_rgb32,
)
from nws.errors import DataError, ParameterError
from tests import official_formats as formats


def test_idx_reader_round_trip_gz_and_raw(tmp_path):
    images, labels = formats.random_images(12, (28, 28), seed=0)
    for gz in (True, False):
        root = tmp_path / f"mnist-{gz}"
        formats.write_mnist_like(root, (images, labels), (images[:5], labels[:5]), gz=gz)
        x_train, y_train, x_test, _ = readers.read_mnist_like(root, "mnist")
        np.testing.assert_array_equal(x_train, images)
        np.testing.assert_array_equal(y_train, labels)
        np.testing.assert_array_equal(x_test, images[:5])
        assert y_train.dtype == np.int64


def test_idx_reader_refuses_a_bad_header(tmp_path):
    images, labels = formats.random_images(4, (28, 28), seed=0)
    formats.write_mnist_like(tmp_path, (images, labels), (images, labels), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + path.read_bytes()[4:])  # float data type code
    with pytest.raises(DataError, match="bad magic number"):
        readers.read_mnist_like(tmp_path, "mnist")
    path.write_bytes(path.read_bytes()[:-10].replace(b"\x00\x00\x0d", b"\x00\x00\x08", 1))
    with pytest.raises(DataError, match="header says"):
        readers.read_mnist_like(tmp_path, "mnist")


@pytest.mark.parametrize("archive", [False, True], ids=["extracted", "tar.gz"])
def test_cifar10_reader(tmp_path, archive):
    train = formats.random_images(25, (32, 32, 3), seed=1)
    test = formats.random_images(7, (32, 32, 3), seed=2)
    formats.write_cifar10(tmp_path / "cifar10", train, test, archive=archive)
    x_train, y_train, x_test, y_test = readers.read_cifar10(tmp_path / "cifar10")
    np.testing.assert_array_equal(x_train, train[0])
    np.testing.assert_array_equal(y_train, train[1])
    np.testing.assert_array_equal(x_test, test[0])
    np.testing.assert_array_equal(y_test, test[1])


def test_cifar10_reader_does_not_unpickle_code(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": print}))
    for name in readers.CIFAR10_FILES[1:]:
        (folder / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"refusing to load builtins\.print"):
        readers.read_cifar10(tmp_path)


def test_svhn_reader_maps_label_ten_to_zero(tmp_path):
    train = formats.random_images(20, (32, 32, 3), seed=3)
    test = formats.random_images(10, (32, 32, 3), seed=4)
    formats.write_svhn(tmp_path, train, test)
    x_train, y_train, x_test, y_test = readers.read_svhn(tmp_path)
    np.testing.assert_array_equal(x_train, train[0])
    np.testing.assert_array_equal(y_train, train[1])
    assert y_train.min() == 0 and y_test.max() == 9
    np.testing.assert_array_equal(x_test, test[0])


def test_stl10_reader_reads_column_major_images(tmp_path):
    train = formats.random_images(6, (96, 96, 3), seed=5)
    test = formats.random_images(4, (96, 96, 3), seed=6)
    formats.write_stl10(tmp_path, train, test)
    x_train, y_train, x_test, _ = readers.read_stl10(tmp_path)
    np.testing.assert_array_equal(x_train, train[0])
    np.testing.assert_array_equal(y_train, train[1])
    np.testing.assert_array_equal(x_test, test[0])
    # Column-major means the first stored bytes run down the first column of the red channel.
    raw = np.fromfile(tmp_path / "stl10_binary" / "train_X.bin", dtype=np.uint8)
    np.testing.assert_array_equal(raw[:96], train[0][0, :, 0, 0])


def test_paper_datasets_load_from_data_dir_as_32x32x3(tmp_path):
    grey = formats.random_images(30, (28, 28), seed=7)
    formats.write_mnist_like(tmp_path / "fashion", grey, (grey[0][:10], grey[1][:10]))
    big = formats.random_images(10, (96, 96, 3), seed=8)
    formats.write_stl10(tmp_path / "stl10", big, big)
    fashion = load_images("fashion", str(tmp_path), download=False)
    assert fashion.x_train.shape == (30, 32, 32, 3) and fashion.x_train.dtype == np.uint8
    # Grey images are repeated to three identical channels.
    np.testing.assert_array_equal(fashion.x_train[..., 0], fashion.x_train[..., 2])
    stl = load_images("stl10", str(tmp_path), download=False)
    assert stl.x_test.shape == (10, 32, 32, 3)


def test_missing_files_give_one_line_naming_the_dataset(tmp_path):
    with pytest.raises(DataError) as error:
        load_images("svhn", str(tmp_path), download=False)
    message = str(error.value)
    assert message.startswith("dataset svhn: train_32x32.mat not found")
    assert "downloads are off" in message and "\n" not in message


@pytest.mark.slow  # builds every offline dataset, twice
def test_offline_datasets_are_deterministic_and_have_ten_classes():
    assert set(OFFLINE_DATASETS) == {"digits", "mnist5k", "shapes", "gratings"}
    for name in OFFLINE_DATASETS:
        data = load_images(name)
        assert data.x_train.shape[1:] == (32, 32, 3) and data.x_train.dtype == np.uint8
        assert set(np.unique(data.y_train)) == set(range(10))
        assert set(np.unique(data.y_test)) == set(range(10))
    digits = load_images("digits")
    assert len(digits.y_train) + len(digits.y_test) == 1797
    mnist5k = load_images("mnist5k")
    assert len(mnist5k.y_train) + len(mnist5k.y_test) == 5000
    from nws.data import offline

    a, b = offline.load_shapes(), offline.load_shapes()
    np.testing.assert_array_equal(a[0], b[0])
    assert np.bincount(a[1]).tolist() == [offline.GENERATED_TRAIN_PER_CLASS] * 10


@pytest.mark.parametrize("name", ["digits", "mnist5k", "shapes", "gratings"])
def test_offline_test_sets_come_in_mixed_order(name):
    """Fidelity paper evaluates the test set in order, in batches, with batch statistics: a
    batch of 32 consecutive test images must hold several classes, as in official test sets."""
    labels = load_images(name).y_test
    classes_per_batch = [len(np.unique(labels[i : i + 32])) for i in range(0, len(labels) - 31, 32)]
    assert min(classes_per_batch) >= 5, classes_per_batch


def test_resolve_datasets_groups_and_errors():
    assert resolve_datasets("paper") == ["mnist", "cifar10", "svhn", "stl10", "fashion"]
    assert resolve_datasets("digits,offline") == ["digits", "mnist5k", "shapes", "gratings"]
    with pytest.raises(ParameterError, match=r"^datasets: unknown dataset 'imagenet'"):
        resolve_datasets("imagenet")


def test_to_rgb32_resizes_and_repeats_channels():
    grey = np.full((2, 8, 8), 200, dtype=np.uint8)
    out = to_rgb32(grey)
    assert out.shape == (2, 32, 32, 3)
    assert np.all(out == 200)  # bilinear resize of a constant image is the constant


def test_split_is_ninety_ten_and_seeded():
    data = load_images("mnist5k")
    a = split_for_net(data, seed=1)
    b = split_for_net(data, seed=1)
    c = split_for_net(data, seed=2)
    assert len(a.y_train) == int(0.9 * len(data.y_train))
    assert len(a.y_train) + len(a.y_valid) == len(data.y_train)
    assert len(a.y_test) == len(data.y_test)
    np.testing.assert_array_equal(a.x_valid, b.x_valid)
    assert not np.array_equal(a.y_valid, c.y_valid)
    capped = split_for_net(data, seed=1, max_train_images=100, max_eval_images=50)
    assert capped.sizes() == {"n_train": 100, "n_valid": 50, "n_test": 50}


def test_balanced_sampler_undersamples_every_class_anew_each_epoch():
    labels = np.repeat(np.arange(4), [50, 20, 35, 20])
    sampler = BalancedSampler(labels, seed=0)
    assert sampler.per_class == 20 and sampler.epoch_size == 80
    first, second = sampler.epoch(), sampler.epoch()
    for epoch in (first, second):
        assert np.bincount(labels[epoch]).tolist() == [20, 20, 20, 20]
        assert len(set(epoch.tolist())) == 80
    assert set(first[labels[first] == 0]) != set(second[labels[second] == 0])


def test_an_offline_dataset_is_made_once_and_kept_and_a_damaged_copy_is_made_again(tmp_path):
    """Generating and resizing an offline dataset takes seconds in every process: the first load
    keeps it in `<data_dir>/offline/`, later loads read it back (the same images), and a damaged
    kept copy is made again instead of being trusted."""
    from nws.data.catalog import load_images

    load_images.cache_clear()
    made = load_images("digits", str(tmp_path))
    (kept,) = (tmp_path / "offline").glob("digits-*.npz")
    load_images.cache_clear()
    read = load_images("digits", str(tmp_path))
    for part in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(read, part), getattr(made, part))
    assert read.x_train.dtype == np.uint8 and read.x_train.shape[1:] == (32, 32, 3)
    kept.write_bytes(kept.read_bytes()[:100])  # cut short
    load_images.cache_clear()
    again = load_images("digits", str(tmp_path))
    np.testing.assert_array_equal(again.x_test, made.x_test)
    assert kept.stat().st_size > 100_000
    load_images.cache_clear()
