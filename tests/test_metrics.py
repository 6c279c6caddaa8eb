"""Claims of trainables/metrics: the Fréchet distance, the reference cache, fd_digits, and the torch-fidelity
FID/IS/KID pipeline (real InceptionV3 code, randomly initialised weights: meaningless numbers, real path)."""

from __future__ import annotations

import math
import re
import shutil
import socket
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import torchvision.transforms.functional as TF
from sklearn.datasets import load_digits

from trainables.data import load_images, real_images
from trainables.metrics import Evaluator, InceptionWeightsMissingError
from trainables.metrics import fd_digits as fd_digits_module
from trainables.metrics.fd_digits import (
    ClassifierSettings,
    DigitsFeatureExtractor,
    classifier_path,
    holdout_split,
    ink_box,
    load_or_train_classifier,
    to_classifier_input,
    train_classifier,
)
from trainables.metrics.frechet import FrechetReference, gaussian_statistics
from trainables.metrics.inception import (
    INCEPTION_FILE,
    INCEPTION_URL,
    build_extractor,
    inception_score_splits,
    resolve_inception_weights,
)
from trainables.metrics.reference import (
    ReferenceStatistics,
    content_fingerprint,
    data_location,
    load_reference,
    reference_path,
    save_reference,
)

DIGITS_KEY = {"dataset": "digits", "split": "train", "resolution": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine's cores are shared: keep this file to one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def from_tensor(images: torch.Tensor):
    """A `generate(b)` that hands out successive slices of `images` (so that a run sees each image once)."""
    position = 0

    def generate(batch: int) -> torch.Tensor:
        nonlocal position
        out = images[position : position + batch]
        position += batch
        return out

    return generate


@pytest.fixture(scope="module")
def digits_32px() -> tuple[torch.Tensor, torch.Tensor]:
    """load_digits as the training data is served: 8×8 0..16 -> 32×32 bilinear -> uint8 0..255, 3 channels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images * 255).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    return images, torch.tensor(digits.target)


@pytest.fixture(scope="module")
def trained_classifier_dir(tmp_path_factory) -> Path:
    """A cache dir holding the trained digits classifier (trained once for the whole module)."""
    cache = tmp_path_factory.mktemp("classifier")
    load_or_train_classifier(cache)
    return cache


@pytest.fixture
def cache_dir(tmp_path, trained_classifier_dir) -> Path:
    """A fresh cache dir with only the trained classifier in it (no reference statistics yet)."""
    shutil.copy(classifier_path(trained_classifier_dir, ClassifierSettings()), tmp_path)
    return tmp_path


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# The Fréchet distance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    return FrechetReference(mu2, sigma2).distance(mu1, sigma1)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_of_the_covariance_product():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    sigma1, sigma2 = random_spd(rng, 32), random_spd(rng, 32)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean.real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_torch_fidelity_fid_formula_on_sample_statistics():
    rng = np.random.default_rng(2)
    features1 = rng.standard_normal((200, 24))
    features2 = rng.standard_normal((150, 24)) @ random_spd(rng, 24) + 0.5
    (mu1, sigma1), (mu2, sigma2) = gaussian_statistics(features1), gaussian_statistics(features2)
    theirs = torch_fidelity.metric_fid.fid_statistics_to_metric(
        {"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False
    )[torch_fidelity.KEY_METRIC_FID]
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(theirs, rel=1e-9)


def test_frechet_distance_of_a_rank_deficient_gaussian_to_itself_is_zero():
    features = np.random.default_rng(3).standard_normal((10, 64)) * 5  # 10 samples in 64-d: rank 9
    mu, sigma = gaussian_statistics(features)
    assert np.linalg.matrix_rank(sigma) == 9
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(4)
    a = (rng.standard_normal(8), random_spd(rng, 8))
    b = (rng.standard_normal(8), random_spd(rng, 8))
    assert frechet_distance(*a, *b) == pytest.approx(frechet_distance(*b, *a), rel=1e-12)


def test_frechet_distance_rejects_mismatched_shapes_naming_the_argument():
    with pytest.raises(ValueError, match=r"sigma: expected shape \(4, 4\)"):
        FrechetReference(np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match=r"mu1: expected a \(4,\) vector, got \(3,\)"):
        FrechetReference(np.zeros(4), np.eye(4)).distance(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma1: contains NaN"):
        FrechetReference(np.zeros(2), np.eye(2)).distance(np.zeros(2), np.array([[1.0, np.nan], [0, 1]]))


def test_distance_to_features_on_the_device_matches_torch_fidelity_statistics_and_formula():
    """FID's path: float32 features (N, D) -> float64 statistics on the device -> distance to the cached
    reference, against torch-fidelity's own statistics and eigvals formula."""
    rng = np.random.default_rng(6)
    generated = torch.from_numpy((rng.standard_normal((300, 32)) * 3 + 1).astype(np.float32))
    real = torch.from_numpy((rng.standard_normal((250, 32)) @ random_spd(rng, 32)).astype(np.float32))
    stats = [torch_fidelity.metric_fid.fid_features_to_statistics(f) for f in (generated, real)]
    theirs = torch_fidelity.metric_fid.fid_statistics_to_metric(*stats, verbose=False)
    theirs = theirs[torch_fidelity.KEY_METRIC_FID]
    ours = FrechetReference(stats[1]["mu"], stats[1]["sigma"]).distance_to_features(generated)
    assert ours == pytest.approx(theirs, rel=1e-6)  # their mean is float32, ours float64


def test_gaussian_statistics_are_the_mean_and_unbiased_covariance():
    features = np.random.default_rng(5).standard_normal((50, 6))
    mu, sigma = gaussian_statistics(features)
    centred = features - features.mean(axis=0)
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)


# The reference cache


def test_reference_path_changes_with_each_key_field_and_is_stable_otherwise(tmp_path):
    key = {"dataset": "cifar10", "split": "train", "resolution": 32, "location": "/data/cifar10"}
    base = {"reference_key": key, "n_real": 5000, "extractor": "inception-v3-compat-2048",
            "fingerprint": "0123456789abcdef"}

    def path(reference_key=None, **changes):
        merged = {**base, **changes}
        return reference_path(tmp_path, reference_key or merged["reference_key"], n_real=merged["n_real"],
                              extractor=merged["extractor"], fingerprint=merged["fingerprint"])

    variants = [
        path(key | {"dataset": "stl10"}),
        path(key | {"split": "test"}),
        path(key | {"resolution": 48}),
        path(key | {"location": "/other/cifar10"}),
        path(n_real=50_000),
        path(extractor="fd_digits-32e766ad46"),
        path(fingerprint="fedcba9876543210"),
    ]
    assert path() == path()
    assert len({path(), *variants}) == 8
    assert path().name.startswith("cifar10-train-32px-n5000-inception-v3-compat-2048-")
    assert path().suffix == ".npz"


def test_reference_key_must_name_dataset_split_and_resolution(tmp_path):
    with pytest.raises(ValueError, match=r"reference_key: missing field\(s\) \['split'\]"):
        reference_path(tmp_path, {"dataset": "cifar10", "resolution": 32}, n_real=10, extractor="x",
                       fingerprint="0")


def test_reference_file_is_a_plain_npz_written_without_leftover_temp_files(tmp_path):
    rng = np.random.default_rng(6)
    stats = ReferenceStatistics(
        mu=rng.standard_normal(3), sigma=np.eye(3), features=rng.standard_normal((5, 3))
    )
    path = reference_path(tmp_path / "cache", DIGITS_KEY, n_real=5, extractor="x", fingerprint="0")
    save_reference(path, stats)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with np.load(path, allow_pickle=False) as arrays:  # no object arrays: nothing needs unpickling
        assert sorted(arrays.files) == ["features", "mu", "sigma"]
    loaded = load_reference(path, with_features=False)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.features is None


def test_second_evaluator_with_the_same_key_reuses_the_cached_statistics(cache_dir, digits_32px, monkeypatch):
    images = digits_32px[0][:400]
    first = Evaluator(
        ("fd_digits",),
        real_images=images,
        reference_key=DIGITS_KEY,
        n_generated=100,
        n_real=400,
        cache_dir=cache_dir,
    )
    [stats_file] = cache_dir.glob("digits-train-32px-n400-fd_digits-*.npz")
    mtime = stats_file.stat().st_mtime_ns

    calls = []
    original = DigitsFeatureExtractor.__call__
    monkeypatch.setattr(
        DigitsFeatureExtractor, "__call__", lambda self, x: calls.append(len(x)) or original(self, x)
    )
    second = Evaluator(
        ("fd_digits",),
        real_images=images,
        reference_key=DIGITS_KEY,
        n_generated=100,
        n_real=400,
        cache_dir=cache_dir,
    )
    assert calls == []  # the real images were not run through the classifier again
    assert stats_file.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second._digits_reference.mu, first._digits_reference.mu)
    np.testing.assert_array_equal(second._digits_reference.sigma, first._digits_reference.sigma)

    Evaluator(
        ("fd_digits",),
        real_images=images,
        reference_key=DIGITS_KEY,
        n_generated=100,
        n_real=300,
        cache_dir=cache_dir,
    )
    assert calls == [300]  # a different sample count is a different entry, computed once
    assert len(list(cache_dir.glob("digits-train-32px-*.npz"))) == 2


def write_mnist(root: Path, digits: np.ndarray) -> Path:
    """MNIST's raw idx files under root/MNIST/raw holding these (N, 28, 28) uint8 digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    def idx(array: np.ndarray) -> bytes:  # zero, zero, uint8 (0x08), dims, big-endian sizes, data
        return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()

    labels = np.zeros(len(digits), dtype=np.uint8)
    for name, array in {"train-images-idx3-ubyte": digits, "train-labels-idx1-ubyte": labels,
                        "t10k-images-idx3-ubyte": digits[:2], "t10k-labels-idx1-ubyte": labels[:2]}.items():
        (raw / name).write_bytes(idx(array))
    return root


def mnist_framed_digits(digit_size: int = 20) -> np.ndarray:
    """load_digits framed as MNIST: each digit resized to digit_size px in a 28 px frame, (1797, 28, 28)."""
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    digits = F.interpolate(digits, size=digit_size, mode="bilinear", align_corners=False, antialias=True)
    pad = (28 - digit_size) // 2
    return (F.pad(digits, (pad,) * 4) * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def test_another_folder_or_other_content_with_the_same_sample_count_never_reuses_statistics(cache_dir,
                                                                                             monkeypatch):
    framed = mnist_framed_digits()
    folders = [write_mnist(cache_dir / name, framed[part]) for name, part
               in (("a", slice(0, 300)), ("b", slice(300, 600)), ("c", slice(600, 900)))]
    loaded = [real_images(load_images("mnist", folder, 32), 300, seed=0) for folder in folders]
    computed = []
    original = DigitsFeatureExtractor.__call__
    monkeypatch.setattr(DigitsFeatureExtractor, "__call__",
                        lambda self, x: computed.append(len(x)) or original(self, x))

    def reference(location: Path, images: torch.Tensor) -> np.ndarray:
        key = {"dataset": "mnist", "split": "train", "resolution": 32,
               "location": data_location("mnist", location)}
        evaluator = Evaluator(("fd_digits",), real_images=images, reference_key=key, n_generated=10,
                              n_real=300, cache_dir=cache_dir)
        return evaluator._digits_reference.mu.cpu().numpy()

    in_a, in_b = reference(folders[0], loaded[0]), reference(folders[1], loaded[1])
    assert computed == [300, 300] and not np.array_equal(in_a, in_b)  # another folder, same count: computed
    np.testing.assert_array_equal(reference(folders[0], loaded[0]), in_a)
    assert computed == [300, 300]  # the same folder and images: reused
    reference(folders[0], loaded[2])  # folder a's files replaced by other digits, still 300 of them
    assert computed == [300, 300, 300]
    assert len(list(cache_dir.glob("mnist-train-32px-n300-*.npz"))) == 3


def test_data_location_and_content_fingerprint_identify_the_data(tmp_path):
    assert data_location("digits", tmp_path) == "sklearn.datasets.load_digits"  # data_root is ignored there
    assert data_location("mnist", tmp_path / "x" / ".." / "m") == str((tmp_path / "m").resolve())
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    changed = images.clone()
    changed[3, 2, 7, 7] = 1
    assert content_fingerprint(images) == content_fingerprint(images.clone())
    assert len({content_fingerprint(images), content_fingerprint(changed),
                content_fingerprint(images[:3]), content_fingerprint(images.float())}) == 4


def test_ink_box_frames_mnist_digits_and_keeps_the_whole_builtin_frame(digits_32px, tmp_path):
    assert ink_box(digits_32px[0]) == (0, 32)
    mnist = real_images(load_images("mnist", write_mnist(tmp_path, mnist_framed_digits()), 32), 1797, seed=0)
    start, stop = ink_box(mnist)  # 20 px digits, 4 px margin in 28, 2 px padding to 32: ink in [6, 26)
    assert 5 <= start <= 6 and 26 <= stop <= 27 and stop - start <= 22
    assert ink_box(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)) == (0, 32)


def constructed_generators(held_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The generators the surrogate must rank, each as n uint8 images (n, 3, 32, 32): held-out real data; a
    diverse but imperfect one (every held-out digit blurred, shifted by up to 2 px, at 80 % contrast, with
    pixel noise); and degenerate ones: one repeated sample, flat green / red / teal fields, uniform noise."""
    n = len(held_out)
    generator = torch.Generator().manual_seed(0)
    blurred = TF.gaussian_blur(held_out.float(), kernel_size=5, sigma=1.0)
    shifts = torch.randint(-2, 3, (n, 2), generator=generator)
    shifted = torch.stack([torch.roll(image, (int(dy), int(dx)), dims=(1, 2))
                           for image, (dy, dx) in zip(blurred, shifts, strict=True)])
    imperfect = shifted * 0.8 + torch.randn(shifted.shape, generator=generator) * 12

    def flat(rgb: tuple[int, int, int]) -> torch.Tensor:
        return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, 32, 32).clone()

    return {
        "real held out": held_out,
        "diverse but imperfect": imperfect.round().clamp(0, 255).to(torch.uint8),
        "one repeated sample": held_out[:1].expand(n, -1, -1, -1).clone(),
        "solid green": flat((0, 255, 0)), "solid red": flat((255, 0, 0)), "solid teal": flat((0, 128, 128)),
        "noise": torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8),
    }


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_fd_digits_ranks_real_then_diverse_then_collapsed_flat_colour_and_noise(dataset, cache_dir):
    # measured, digits: 8.2 | 381 | 2410, 5699, 5699, 2928, 1321; MNIST framing: 6.9 | 540 | 2180, 5544, 5544,
    # 2763, 1174 (uniform noise, averaged to 8x8, looks like a grey field: the weakest, 2.2x the diverse one)
    root = write_mnist(cache_dir / "data", mnist_framed_digits())
    source = load_images(dataset, root, 32)
    images = source.uint8(torch.arange(len(source)))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    reference, held_out = images[order[:1000]], images[order[1000:]]
    evaluator = Evaluator(("fd_digits",), real_images=reference, n_generated=len(held_out), n_real=1000,
                          reference_key={"dataset": dataset, "split": "train", "resolution": 32},
                          cache_dir=cache_dir)
    scores = {name: evaluator(from_tensor(generated))["fd_digits"]
              for name, generated in constructed_generators(held_out).items()}
    real, diverse = scores.pop("real held out"), scores.pop("diverse but imperfect")
    assert diverse > 20 * real, scores
    for name, score in scores.items():
        assert score > 2 * diverse, (name, score, diverse)
    level = evaluator.constant_level("fd_digits")
    assert level == pytest.approx(np.trace(evaluator._digits_reference.sigma.cpu().numpy()))
    for constant in ("one repeated sample", "solid green", "solid red", "solid teal"):
        assert scores[constant] >= level  # a generator without variety scores at least tr(sigma_real)


def test_fd_digits_sees_colour_that_a_grayscale_conversion_hides(cache_dir, digits_32px):
    images = digits_32px[0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    reference, held_out = images[order[:898]], images[order[898:1796]]
    green = torch.zeros_like(held_out)
    green[:, 1] = held_out[:, 1]  # the same digits, drawn in the green channel only
    evaluator = Evaluator(("fd_digits",), real_images=reference, reference_key=DIGITS_KEY, n_generated=898,
                          n_real=898, cache_dir=cache_dir)
    gray, coloured = evaluator(from_tensor(held_out))["fd_digits"], evaluator(from_tensor(green))["fd_digits"]
    assert coloured > 100 * gray  # measured 3759 against 9.17


# fd_digits


def test_digits_classifier_trains_deterministically_to_high_heldout_accuracy(trained_classifier_dir):
    settings = ClassifierSettings()
    model, accuracy = train_classifier(settings)
    cached = torch.load(classifier_path(trained_classifier_dir, settings), weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, cached["state_dict"][name]), name
    assert accuracy == cached["heldout_accuracy"]
    assert accuracy >= 0.97  # measured: 0.981 on the 359 held-out images


def test_cached_classifier_is_loaded_not_retrained(trained_classifier_dir, monkeypatch):
    def fail(settings):
        raise AssertionError("retrained although the classifier is cached")

    monkeypatch.setattr(fd_digits_module, "train_classifier", fail)
    model, accuracy = load_or_train_classifier(trained_classifier_dir)
    assert accuracy >= 0.97
    other = ClassifierSettings(epochs=3)  # other settings: another file name, so it must train
    assert classifier_path(trained_classifier_dir, other) != classifier_path(
        trained_classifier_dir, ClassifierSettings()
    )
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_classifier(trained_classifier_dir, other)


@pytest.mark.parametrize("resolution", [8, 32, 64])
def test_classifier_input_inverts_nearest_upsampling_at_any_resolution(resolution):
    original = torch.tensor(load_digits().images[:200], dtype=torch.float32).unsqueeze(1) / 16
    upsampled = F.interpolate(original, size=resolution, mode="nearest")
    images = (upsampled * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    recovered = to_classifier_input(images)
    assert recovered.shape == (200, 3, 8, 8)  # each colour channel is a digit image of its own
    assert (recovered - original).abs().max() <= 0.5 / 255 + 1e-6  # only the uint8 rounding is lost


def test_classifier_keeps_its_heldout_accuracy_on_digits_served_bilinearly_at_32px(
    trained_classifier_dir, digits_32px
):
    model, _ = load_or_train_classifier(trained_classifier_dir)
    images, labels = digits_32px
    holdout, _ = holdout_split(ClassifierSettings(), len(images))
    with torch.no_grad():
        predictions = model(to_classifier_input(images[holdout])[:, :1]).argmax(1)
    # measured: 0.969 (348 of 359), against 0.981 on the original 8×8 images; the bilinear round trip blurs
    assert (predictions == labels[holdout]).double().mean().item() >= 0.95


def test_fd_digits_is_near_zero_between_real_halves_and_large_for_noise(cache_dir, digits_32px):
    images = digits_32px[0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    half_a, half_b = images[order[:898]], images[order[898:1796]]
    evaluator = Evaluator(
        ("fd_digits",),
        real_images=half_a,
        reference_key=DIGITS_KEY,
        n_generated=898,
        n_real=898,
        cache_dir=cache_dir,
    )
    between_halves = evaluator(from_tensor(half_b))["fd_digits"]
    noise = evaluator(lambda b: torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8))["fd_digits"]
    assert between_halves < 15  # measured 9.17 (3 colour channels: 3x the grayscale distance)
    assert noise > 100 * between_halves  # measured 1321


def test_fd_digits_is_large_for_a_generator_collapsed_onto_one_digit(cache_dir, digits_32px):
    images, labels = digits_32px
    evaluator = Evaluator(
        ("fd_digits",),
        real_images=images,
        reference_key=DIGITS_KEY,
        n_generated=300,
        n_real=len(images),
        cache_dir=cache_dir,
    )
    held_back = evaluator(from_tensor(images[torch.randperm(len(images))[:300]]))["fd_digits"]
    collapsed = [
        evaluator(from_tensor(images[labels == digit][:300].repeat(2, 1, 1, 1)))["fd_digits"]
        for digit in range(10)
    ]
    assert held_back < 30  # measured 14.3 (300 of the real images against all 1797)
    assert min(collapsed) > 20 * held_back  # measured 680..2023


def test_generated_batches_of_the_wrong_shape_or_dtype_are_rejected_naming_generate(cache_dir, digits_32px):
    evaluator = Evaluator(
        ("fd_digits",),
        real_images=digits_32px[0][:100],
        reference_key=DIGITS_KEY,
        n_generated=10,
        n_real=100,
        cache_dir=cache_dir,
    )
    with pytest.raises(
        ValueError,
        match=r"generate\(10\): expected a uint8 tensor of shape \(10, 3, 32, 32\), "
        r"got torch.float32",
    ):
        evaluator(lambda b: torch.zeros(b, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(10, 3, 64, 64\)"):
        evaluator(lambda b: torch.zeros(b, 3, 64, 64, dtype=torch.uint8))


# The Evaluator's arguments


def test_evaluator_rejects_unknown_metric_names_listing_the_valid_ones(tmp_path, digits_32px):
    with pytest.raises(ValueError, match=r"names: unknown \['fid_digits'\].*valid .*fid, is, kid, fd_digits"):
        Evaluator(
            ("fid_digits",),
            real_images=digits_32px[0],
            reference_key=DIGITS_KEY,
            n_generated=10,
            n_real=10,
            cache_dir=tmp_path,
        )


def test_evaluator_rejects_more_real_samples_than_real_images(tmp_path, digits_32px):
    with pytest.raises(ValueError, match="n_real: 5000 exceeds the 100 real images given"):
        Evaluator(
            ("fd_digits",),
            real_images=digits_32px[0][:100],
            reference_key=DIGITS_KEY,
            n_generated=10,
            n_real=5000,
            cache_dir=tmp_path,
        )


def test_evaluator_rejects_a_reference_key_whose_resolution_differs_from_the_images(tmp_path, digits_32px):
    with pytest.raises(ValueError, match="reference_key: resolution 64 does not match the 32 px real images"):
        Evaluator(
            ("fd_digits",),
            real_images=digits_32px[0][:10],
            reference_key={**DIGITS_KEY, "resolution": 64},
            n_generated=10,
            n_real=10,
            cache_dir=tmp_path,
        )


def test_evaluator_rejects_real_images_that_are_not_uint8_rgb(tmp_path):
    with pytest.raises(ValueError, match=r"real_images: expected a uint8 tensor of shape \(N, 3, R, R\)"):
        Evaluator(
            ("fd_digits",),
            real_images=torch.zeros(10, 1, 32, 32),
            reference_key=DIGITS_KEY,
            n_generated=10,
            n_real=10,
            cache_dir=tmp_path,
        )


# The Inception weights


def test_missing_configured_weights_fail_fast_naming_the_file_the_url_and_the_config_field(
    tmp_path, digits_32px
):
    absent = tmp_path / "weights" / INCEPTION_FILE
    with pytest.raises(InceptionWeightsMissingError) as error:
        Evaluator(
            ("fid", "is", "kid"),
            real_images=digits_32px[0][:10],
            reference_key=DIGITS_KEY,
            n_generated=10,
            n_real=10,
            cache_dir=tmp_path,
            inception_weights=absent,
        )
    message = str(error.value)
    assert str(absent) in message and INCEPTION_URL in message and "`inception_weights`" in message
    assert list(tmp_path.glob("*.npz")) == []  # nothing was computed on the way to the error


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_hub_weights_fail_fast_when_the_download_is_refused(tmp_path, monkeypatch, closed_port):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = f"http://127.0.0.1:{closed_port}/{INCEPTION_FILE}"
    with pytest.raises(InceptionWeightsMissingError) as error:
        resolve_inception_weights(None, url=url, connect_timeout_s=5)
    message = str(error.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE) in message
    assert url in message and "`inception_weights`" in message and "download failed" in message


def test_weights_download_gives_up_after_the_timeout_on_a_silent_server(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with socket.socket() as silent:  # listens (the kernel completes the handshake) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/{INCEPTION_FILE}"
        with pytest.raises(InceptionWeightsMissingError) as error:
            resolve_inception_weights(None, url=url, connect_timeout_s=1)
    # whichever ends first, the probe's join or its socket's timeout: the reason is the timeout
    assert re.search(r"no answer within 1 s|timed out", str(error.value)), str(error.value)


def test_weights_that_do_not_fit_inception_are_rejected_naming_the_config_field(tmp_path, digits_32px):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match=f"inception_weights: {wrong} does not load as torch-fidelity"):
        Evaluator(
            ("fid",),
            real_images=digits_32px[0][:10],
            reference_key=DIGITS_KEY,
            n_generated=10,
            n_real=10,
            cache_dir=tmp_path,
            inception_weights=wrong,
        )


# The torch-fidelity pipeline, end to end, with randomly initialised Inception weights


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A state_dict with exactly the keys and shapes FeatureExtractorInceptionV3 loads, from a random network.

    The class always loads weights in its constructor, so loading is switched off while it is built. Convs get
    Kaiming-normal weights so that activations keep their scale through the depth (PyTorch's default init
    shrinks them layer by layer, and every feature would be near 0).
    """
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(network.fc.weight, std=0.1)  # logits of order 1 rather than 0.01: IS visibly > 1
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(network.state_dict(), path)
    return path


INCEPTION_IMAGES = 8  # torch-fidelity's Inception at 299 px on one CPU thread: about 0.2-0.4 s per image


@pytest.mark.slow
def test_inception_pipeline_matches_calculate_metrics_and_fid_of_a_set_to_itself_is_zero(
    random_inception_weights, cache_dir
):
    rng = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (INCEPTION_IMAGES, 3, 16, 16), generator=rng, dtype=torch.uint8)
    noise = (torch.rand(INCEPTION_IMAGES, 3, 16, 16, generator=rng) ** 3 * 255).to(torch.uint8)
    key = {"dataset": "noise", "split": "train", "resolution": 16}
    evaluator = Evaluator(
        ("fid", "is", "kid", "fd_digits"),  # fd_digits alongside: both feature paths in one evaluator
        real_images=real,
        reference_key=key,
        n_generated=INCEPTION_IMAGES,
        n_real=INCEPTION_IMAGES,
        cache_dir=cache_dir,
        inception_weights=random_inception_weights,
    )
    assert (
        len(list(cache_dir.glob(f"noise-train-16px-n{INCEPTION_IMAGES}-inception-v3-compat-2048-*.npz"))) == 1
    )

    # Each feature path draws its n images in one batch (n < batch size): both see the same images.
    ours = evaluator(lambda b: noise[:b])
    assert list(ours) == ["fid", "is", "kid", "fd_digits"]
    theirs = torch_fidelity.calculate_metrics(
        input1=torch_fidelity.GenerativeModelModuleWrapper(_Replay(noise), 1, "normal", 0),
        input1_model_num_samples=INCEPTION_IMAGES,
        input2=_Images(real),
        isc=True,
        kid=True,  # no fid: its 2048×2048 eigvals costs more than all of this test's Inception passes
        kid_subset_size=INCEPTION_IMAGES,
        isc_splits=inception_score_splits(INCEPTION_IMAGES),
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
        feature_extractor_weights_path=str(random_inception_weights),
    )
    assert ours["is"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    # KID equal: the same 2048-d features on both sides, generated and (through our cache) real, which are
    # all that FID reads besides torch-fidelity's own statistics and formula (which ours calls)
    assert ours["kid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-6, abs=1e-9)
    assert all(math.isfinite(value) for value in ours.values())

    itself = evaluator(lambda b: real[:b])
    assert all(math.isfinite(value) for value in itself.values())
    assert abs(itself["fid"]) < 1e-5 * ours["fid"]  # measured: -2e-7 against 0.59
    assert itself["fd_digits"] < 1e-9 < ours["fd_digits"]
    assert ours["is"] > 1  # a split of one image would give exactly 1 (measured: 1.0003 with random weights)


@pytest.mark.slow
def test_is_reads_its_own_count_of_images_and_fid_the_first_of_them(random_inception_weights, tmp_path):
    """The paper's protocol, IS on 50k generated and FID on 10k, here 8 and 4: one pass of 8 feeds both."""
    rng = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (4, 3, 16, 16), generator=rng, dtype=torch.uint8)
    generated = torch.randint(0, 256, (8, 3, 16, 16), generator=rng, dtype=torch.uint8)
    key = {"dataset": "noise", "split": "train", "resolution": 16}

    def evaluator(names, n_generated, n_generated_is=None):
        return Evaluator(names, real_images=real, reference_key=key, n_generated=n_generated,
                         n_generated_is=n_generated_is, n_real=4, cache_dir=tmp_path,
                         inception_weights=random_inception_weights)

    drawn = []

    def generate(batch: int) -> torch.Tensor:
        drawn.append(batch)
        return generated[sum(drawn) - batch:sum(drawn)]

    both = evaluator(("fid", "is"), 4, n_generated_is=8)(generate)
    assert sum(drawn) == 8
    assert both["is"] == evaluator(("is",), 8)(from_tensor(generated))["is"]  # IS of all 8 images
    assert both["fid"] == pytest.approx(evaluator(("fid",), 4)(from_tensor(generated[:4]))["fid"], rel=1e-9)
    assert both["is"] != evaluator(("is",), 4)(from_tensor(generated))["is"]  # not of FID's 4


def test_evaluator_rejects_an_is_count_below_two(tmp_path, digits_32px):
    with pytest.raises(ValueError, match="n_generated_is: expected an integer >= 2, got 1"):
        Evaluator(("fd_digits",), real_images=digits_32px[0][:10], reference_key=DIGITS_KEY, n_generated=10,
                  n_generated_is=1, n_real=10, cache_dir=tmp_path)


@pytest.mark.slow
def test_channels_last_inception_gives_the_same_features(random_inception_weights):
    """On CUDA the extractor runs in channels_last (build_extractor): the layout must not change a feature."""
    extractor = build_extractor(random_inception_weights, ("fid", "is"), torch.device("cpu"))
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 16, 16), generator=rng, dtype=torch.uint8)
    with torch.no_grad():
        contiguous = extractor(images)
        extractor.to(memory_format=torch.channels_last)
        channels_last = extractor(images)
    assert extractor.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert [f.shape for f in contiguous] == [(3, 2048), (3, 1008)]
    for ours, reference in zip(channels_last, contiguous, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


class _Replay(torch.nn.Module):
    """For torch-fidelity's own wrapper: ignores the noise and replays fixed images in order."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.generate = from_tensor(images)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.generate(noise.shape[0])


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluator_on_cuda_agrees_with_cpu(
    random_inception_weights, trained_classifier_dir, tmp_path, digits_32px
):
    images = digits_32px[0][:INCEPTION_IMAGES]
    noise = torch.randint(
        0, 256, (INCEPTION_IMAGES, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    results = {}
    for device in ("cpu", "cuda"):
        cache = tmp_path / device  # each device computes its own real statistics
        cache.mkdir()
        shutil.copy(classifier_path(trained_classifier_dir, ClassifierSettings()), cache)
        evaluator = Evaluator(
            ("fid", "is", "kid", "fd_digits"),
            real_images=images,
            reference_key=DIGITS_KEY,
            n_generated=INCEPTION_IMAGES,
            n_real=INCEPTION_IMAGES,
            cache_dir=cache,
            inception_weights=random_inception_weights,
            device=device,
        )
        on_device = noise.to(device)
        results[device] = evaluator(lambda b, source=on_device: source[:b])
    for name, value in results["cpu"].items():  # loose: cuDNN convolutions run in TF32 by default
        assert results["cuda"][name] == pytest.approx(value, rel=5e-2, abs=1e-4), name
