"""trainables.data: each dataset's real on-disk format, written here, read through the real loader."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from trainables.config import DATASETS
from trainables.data import (
    BatchSampler,
    DatasetFormatError,
    DatasetNotFoundError,
    InMemoryImages,
    load_images,
    real_images,
    sample_images,
)

torch.set_num_threads(1)


def every_image(source) -> torch.Tensor:
    return source.uint8(torch.arange(len(source)))


def index_coded_source(n: int = 8) -> InMemoryImages:
    """n gray 4x4 images; image i is filled with the value 30 * i, so a batch tells which images it holds."""
    values = (30 * torch.arange(n, dtype=torch.uint8)).view(n, 1, 1, 1)
    return InMemoryImages("coded", values.expand(n, 1, 4, 4).contiguous())


def drawn_indices(batch: torch.Tensor) -> torch.Tensor:
    return ((batch[:, 0, 0, 0] + 1) * 127.5).round().long() // 30


# ---- digits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 48])
def test_digits_are_1797_images_spanning_minus1_to_1(resolution):
    source = load_images("digits", "unused", resolution)
    assert len(source) == 1797
    images = every_image(source)
    assert images.shape == (1797, 3, resolution, resolution) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 2])  # gray replicated
    batch = BatchSampler(source, 64, seed=0).next()
    assert batch.shape == (64, 3, resolution, resolution) and batch.dtype == torch.float32
    floats = images.float() / 127.5 - 1
    assert floats.min() == -1 and floats.max() == 1


def test_digits_at_8px_are_sklearn_values_scaled_from_16_to_255():
    images = every_image(load_images("digits", "unused", 8))
    expected = torch.from_numpy(load_digits().images * 255 / 16).round().to(torch.uint8)
    assert torch.equal(images[:, 1], expected)


# ---- cifar10 -------------------------------------------------------------------------------------

class Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 wrote its str (BINSTRING), as in the official CIFAR-10 batch files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str
    dispatch[str] = save_python2_str


def cifar_batch_bytes(images: np.ndarray, style: str) -> bytes:
    """A data_batch file holding `images` (N, 32, 32, 3) uint8, in CIFAR-10's dict layout."""
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [i % 10 for i in range(len(images))],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),  # R plane, G plane, B plane
        b"filenames": [f"image_{i}.png".encode() for i in range(len(images))],
    }
    if style == "python3":
        return pickle.dumps(batch, protocol=4)
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch)
    # The official files name numpy's array rebuild function by its numpy 1 module.
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar10(root: Path, images: np.ndarray, style: str = "python2") -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(images, 5), start=1):
        (folder / f"data_batch_{i}").write_bytes(cifar_batch_bytes(part, style))


@pytest.mark.parametrize("style", ["python2", "python3"])
def test_cifar10_batches_read_in_order_with_channel_planes_row_major(tmp_path, style):
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)  # N, H, W, RGB
    write_cifar10(tmp_path, images, style)
    loaded = every_image(load_images("cifar10", tmp_path, 32))
    assert torch.equal(loaded, torch.from_numpy(images).permute(0, 3, 1, 2))


def test_cifar10_at_16px_is_the_mean_of_each_2x2_block(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_cifar10(tmp_path, images)
    loaded = every_image(load_images("cifar10", tmp_path, 16))
    blocks = torch.from_numpy(images).permute(0, 3, 1, 2).double().unfold(2, 2, 2).unfold(3, 2, 2)
    assert torch.equal(loaded, (blocks.mean((-1, -2)) + 0.5).floor().to(torch.uint8))


def test_cifar10_unpickler_refuses_a_batch_that_calls_os_system(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_cifar10(tmp_path, np.zeros((5, 32, 32, 3), np.uint8))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os|nt)\.system"):
        load_images("cifar10", tmp_path, 32)
    assert not marker.exists()


def test_cifar10_missing_batch_error_names_file_url_and_download(tmp_path):
    write_cifar10(tmp_path, np.zeros((5, 32, 32, 3), np.uint8))
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_images("cifar10", tmp_path, 32)
    message = str(info.value)
    assert "Missing: data_batch_5." in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "download: true" in message


# ---- stl10 ---------------------------------------------------------------------------------------

def stl10_images(n: int = 3) -> np.ndarray:
    """(n, 3, 96, 96) uint8 [image, channel, row y, column x]: red = 2y, green = 2x, blue = 50 * image."""
    y, x = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    return np.stack([np.stack([2 * y, 2 * x, np.full_like(x, 50 * i)]) for i in range(n)]).astype(np.uint8)


def write_stl10(root: Path, images: np.ndarray) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    # The official binary stores each channel column-major: x is the slow index within a channel.
    (folder / "unlabeled_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())


def test_stl10_unlabeled_images_come_out_upright_not_transposed(tmp_path):
    images = stl10_images()
    write_stl10(tmp_path, images)
    loaded = every_image(load_images("stl10", tmp_path, 96))
    assert torch.equal(loaded, torch.from_numpy(images))
    assert loaded[0, 0, 10, 0] == 20 and loaded[0, 1, 0, 10] == 20  # red grows down the rows, green across


def test_stl10_at_48px_is_the_official_2x2_block_mean(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 96, 96), dtype=np.uint8)
    write_stl10(tmp_path, images)
    loaded = every_image(load_images("stl10", tmp_path, 48))
    blocks = torch.from_numpy(images).double().unfold(2, 2, 2).unfold(3, 2, 2)
    assert torch.equal(loaded, (blocks.mean((-1, -2)) + 0.5).floor().to(torch.uint8))


# ---- celeba --------------------------------------------------------------------------------------

QUADRANTS = [(0, 0, 160), (0, 160, 0), (160, 0, 0), (0, 0, 0)]  # top left, top right, bottom left, right


def celeba_face(quadrants: list[tuple[int, int, int]]) -> Image.Image:
    """178 x 218 px as the aligned faces: white outside the centre 128 px square, 4 colour quadrants in it."""
    pixels = np.full((218, 178, 3), 255, np.uint8)
    top, left = (218 - 128) // 2, (178 - 128) // 2  # 45, 25
    for k, colour in enumerate(quadrants):
        row, col = top + 64 * (k // 2), left + 64 * (k % 2)
        pixels[row:row + 64, col:col + 64] = colour
    return Image.fromarray(pixels)


def write_celeba(root: Path, faces: list[list[tuple[int, int, int]]], partitions: str) -> None:
    """CelebA as distributed: img_align_celeba/000001.jpg ... and list_eval_partition.txt ("000001.jpg 0")."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    for i, quadrants in enumerate(faces, start=1):
        celeba_face(quadrants).save(folder / "img_align_celeba" / f"{i:06d}.jpg", quality=100, subsampling=0)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{i:06d}.jpg {code}\n" for i, code in enumerate(partitions, start=1)))


def expected_face(quadrants: list[tuple[int, int, int]]) -> torch.Tensor:
    """The 128 px centre crop of celeba_face halved to 64 px: four 32 px quadrants."""
    expected = torch.empty(3, 64, 64, dtype=torch.int32)
    for k, colour in enumerate(quadrants):
        row, col = 32 * (k // 2), 32 * (k % 2)
        expected[:, row:row + 32, col:col + 32] = torch.tensor(colour)[:, None, None]
    return expected


GREEN = [(0, 255, 0)] * 4
# Four faces, in the train, valid, train, test partitions; the last file's name sorts after the others.
FACES, PARTITIONS = [QUADRANTS, GREEN, QUADRANTS[::-1], [(0, 0, 255)] * 4], "0102"


def test_celeba_is_every_aligned_face_in_file_order_centre_cropped_128_then_halved_to_64(tmp_path):
    write_celeba(tmp_path, FACES, PARTITIONS)
    source = load_images("celeba", tmp_path, 64)  # split "all", the official preprocessing
    assert (len(source), source.split) == (4, "all")
    for image, quadrants in zip(every_image(source).int(), FACES, strict=True):
        # JPEG at quality 100 is off by a few levels; one pixel of white border in a 2x2 block would add ~60.
        assert (image - expected_face(quadrants)).abs().max() <= 12


def test_celeba_all_needs_no_partition_file(tmp_path):
    write_celeba(tmp_path, FACES[:2], PARTITIONS[:2])
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    assert len(load_images("celeba", tmp_path, 64)) == 2


@pytest.mark.parametrize(("split", "faces"), [("train", [0, 2]), ("valid", [1]), ("test", [3])])
def test_celeba_split_is_its_partition_of_list_eval_partition(tmp_path, split, faces):
    write_celeba(tmp_path, FACES, PARTITIONS)
    source = load_images("celeba", tmp_path, 64, split=split)
    assert (len(source), source.split) == (len(faces), split)
    for image, face in zip(every_image(source).int(), faces, strict=True):
        assert (image - expected_face(FACES[face])).abs().max() <= 12


def test_celeba_split_without_the_partition_file_error_names_it(tmp_path):
    write_celeba(tmp_path, FACES[:1], PARTITIONS[:1])
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="expected .*celeba/list_eval_partition.txt"):
        load_images("celeba", tmp_path, 64, split="train")


def test_a_split_other_than_all_is_refused_outside_celeba_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="split: 'train' is not a split of cifar10; valid: all"):
        load_images("cifar10", tmp_path, 32, split="train")
    with pytest.raises(ValueError, match="split: .val. is not a split of celeba; valid: all, train, valid"):
        load_images("celeba", tmp_path, 64, split="val")


# ---- imagefolder ---------------------------------------------------------------------------------

def coordinate_image(width: int, height: int) -> Image.Image:
    """Red = 4x, green = 3y, blue = 7: every pixel says where it was."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return Image.fromarray(np.stack([4 * x, 3 * y, np.full_like(x, 7)], axis=-1).astype(np.uint8))


def test_imagefolder_cuts_the_centre_square_of_non_square_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    coordinate_image(63, 40).save(tmp_path / "a" / "landscape.png")  # crop columns 11..50 (odd pixel right)
    coordinate_image(40, 71).save(tmp_path / "a" / "portrait.png")  # crop rows 15..54 (odd pixel bottom)
    gray = np.tile(np.arange(50, dtype=np.uint8) * 5, (50, 1))
    Image.fromarray(gray, mode="L").save(tmp_path / "b" / "gray.png")
    Image.new("RGB", (80, 60), (10, 200, 90)).save(tmp_path / "b" / "photo.jpg", quality=95)
    source = load_images("imagefolder", tmp_path, 40)
    assert len(source) == 4
    landscape, portrait, gray, photo = every_image(source).int()
    k = torch.arange(40)
    assert torch.equal(landscape[0, 0], 4 * (k + 11)) and torch.equal(landscape[1, :, 0], 3 * k)
    assert torch.equal(portrait[0, 0], 4 * k) and torch.equal(portrait[1, :, 0], 3 * (k + 15))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert (photo - torch.tensor([10, 200, 90])[:, None, None]).abs().max() <= 3


def test_imagefolder_resizes_the_crop_to_the_resolution_asked(tmp_path):
    (tmp_path / "a").mkdir()
    coordinate_image(60, 40).save(tmp_path / "a" / "wide.png")  # crop columns 10..49
    loaded = every_image(load_images("imagefolder", tmp_path, 20))[0].int()
    k = torch.arange(20)
    # 40 -> 20 px averages columns 10 + 2k and 11 + 2k: red 4 * (10.5 + 2k), exactly 42 + 8k.
    assert torch.equal(loaded[0, 0], 42 + 8 * k)


def test_undecodable_file_error_names_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a JPEG")
    source = load_images("imagefolder", tmp_path, 32)
    with pytest.raises(RuntimeError, match=r"imagefolder: cannot decode .*a/broken\.jpg"):
        source.uint8(torch.tensor([0]))


def test_celeba_image_smaller_than_the_128px_crop_error_names_it(tmp_path):
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    Image.new("RGB", (100, 150)).save(tmp_path / "celeba" / "img_align_celeba" / "000001.jpg")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    source = load_images("celeba", tmp_path, 64)
    with pytest.raises(ValueError, match=r"000001\.jpg is 100x150 px, smaller than the 128 px crop"):
        source.uint8(torch.tensor([0]))


# ---- mnist ---------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: zero, zero, type 0x08 (uint8), number of dimensions, big-endian int32 sizes, data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gzip"])
def test_mnist_idx_digits_are_zero_padded_to_32_and_gray_replicated(tmp_path, compressed):
    rng = np.random.default_rng(2)
    digits = rng.integers(1, 256, (6, 28, 28), dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte": digits, "train-labels-idx1-ubyte": np.arange(6, dtype=np.uint8),
        "t10k-images-idx3-ubyte": digits[:2], "t10k-labels-idx1-ubyte": np.arange(2, dtype=np.uint8),
    }
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in files.items():
        if compressed:
            (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (raw / name).write_bytes(idx_bytes(array))
    loaded = every_image(load_images("mnist", tmp_path, 32))
    assert loaded.shape == (6, 3, 32, 32)
    assert torch.equal(loaded[:, :, 2:30, 2:30], torch.from_numpy(digits)[:, None].expand(6, 3, 28, 28))
    assert loaded.sum() == loaded[:, :, 2:30, 2:30].sum()  # the 2 px border is zero


# ---- missing data and bad arguments --------------------------------------------------------------

@pytest.mark.parametrize(
    ("dataset", "expected_path", "how"),
    [
        ("cifar10", "cifar-10-batches-py", "download: true"),
        ("stl10", "stl10_binary/unlabeled_X.bin", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
        ("celeba", "celeba/img_align_celeba", "download: true"),
        ("imagefolder", "", "ImageFolder tree"),
        ("mnist", "MNIST/raw", "download: true"),
    ],
)
def test_missing_dataset_error_names_dataset_path_and_remedy(tmp_path, dataset, expected_path, how):
    with pytest.raises(DatasetNotFoundError) as info:
        load_images(dataset, tmp_path, 32)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"dataset {dataset!r} not found" in message
    assert f"expected {tmp_path / expected_path}" in message
    assert how in message


def test_dataset_not_found_error_survives_pickling_as_ray_sends_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_images("stl10", tmp_path, 48)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is DatasetNotFoundError and str(copy) == str(info.value)
    assert copy.path == tmp_path / "stl10_binary" / "unlabeled_X.bin"


def test_unknown_dataset_error_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"dataset: unknown 'cifar100'; valid: ") as info:
        load_images("cifar100", "data", 32)
    assert all(name in str(info.value) for name in DATASETS)


@pytest.mark.parametrize("resolution", [0, -32, 32.0])
def test_bad_resolution_error_names_the_argument(resolution):
    with pytest.raises(ValueError, match=r"^resolution: must be an int > 0"):
        load_images("digits", "data", resolution)


@pytest.mark.parametrize("batch_size", [1, 0])
def test_batch_size_below_two_error_names_the_argument(batch_size):
    with pytest.raises(ValueError, match=r"^batch_size: must be an int >= 2"):
        BatchSampler(index_coded_source(), batch_size, seed=0)


# ---- sampling ------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_batches_and_another_seed_others():
    source = load_images("digits", "unused", 32)
    first, again, other = (BatchSampler(source, 16, seed=seed) for seed in (0, 0, 1))
    for _ in range(3):
        batch = first.next()
        assert torch.equal(batch, again.next())
        assert not torch.equal(batch, other.next())


def test_batches_are_uniform_with_replacement():
    sampler = BatchSampler(index_coded_source(8), 16, seed=3)
    indices = torch.cat([drawn_indices(sampler.next()) for _ in range(250)])
    counts = torch.bincount(indices, minlength=8).double()
    assert counts.sum() == 4000  # 16 draws from 8 images: only possible with replacement
    chi_square = ((counts - 500) ** 2 / 500).sum()
    assert chi_square < 24.3  # the 0.1% tail of chi-square with 7 degrees of freedom


def test_pixels_0_and_255_become_exactly_minus1_and_1():
    source = InMemoryImages("extremes", torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1))
    batch = BatchSampler(source, 64, seed=0).next()
    assert set(batch.unique().tolist()) == {-1.0, 1.0}


def test_state_dict_round_trip_continues_the_identical_stream():
    source = load_images("digits", "unused", 32)
    uninterrupted = BatchSampler(source, 8, seed=5)
    for _ in range(3):
        uninterrupted.next()
    saved = io.BytesIO()
    torch.save(uninterrupted.state_dict(), saved)
    expected = [uninterrupted.next() for _ in range(4)]

    resumed = BatchSampler(source, 8, seed=5)
    assert not torch.equal(resumed.next(), expected[0])  # a fresh sampler restarts the stream ...
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for batch in expected:  # ... the restored one continues it
        assert torch.equal(resumed.next(), batch)


@pytest.mark.parametrize(("key", "changed"), [("resolution", dict(resolution=48)), ("seed", dict(seed=1))])
def test_load_state_dict_refuses_a_state_from_other_data_or_seed(key, changed):
    settings = dict(resolution=32, seed=0) | changed
    saved = BatchSampler(load_images("digits", "unused", 32), 8, seed=0).state_dict()
    sampler = BatchSampler(load_images("digits", "unused", settings["resolution"]), 8, seed=settings["seed"])
    with pytest.raises(ValueError, match=rf"^state {key}: the checkpoint has"):
        sampler.load_state_dict(saved)


def test_load_images_prepares_each_dataset_once_per_process():
    assert load_images("digits", "unused", 32) is load_images("digits", "unused", 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches_and_resume_from_a_cuda_mapped_checkpoint():
    source = load_images("digits", "unused", 32)
    on_cpu, on_cuda = BatchSampler(source, 32, seed=7), BatchSampler(source, 32, seed=7, device="cuda")
    for _ in range(3):
        batch = on_cuda.next()
        assert batch.device.type == "cuda"
        assert torch.equal(batch.cpu(), on_cpu.next())
    saved = io.BytesIO()
    torch.save(on_cuda.state_dict(), saved)
    saved.seek(0)
    resumed = BatchSampler(source, 32, seed=7, device="cuda")
    resumed.load_state_dict(torch.load(saved, map_location="cuda", weights_only=True))  # as train.py loads
    assert torch.equal(resumed.next(), on_cuda.next())


# ---- reference images ----------------------------------------------------------------------------

def test_real_images_are_distinct_seeded_and_all_when_n_exceeds_the_dataset():
    source = index_coded_source(8)
    first = drawn_indices(real_images(source, 5, seed=0).float() / 127.5 - 1)
    assert len(set(first.tolist())) == 5
    assert torch.equal(first, drawn_indices(real_images(source, 5, seed=0).float() / 127.5 - 1))
    assert not torch.equal(first, drawn_indices(real_images(source, 5, seed=1).float() / 127.5 - 1))
    assert sorted(drawn_indices(real_images(source, 20).float() / 127.5 - 1).tolist()) == list(range(8))


def test_real_images_reads_lazily_decoded_files(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(tmp_path / "a" / f"{i}.png")
    images = real_images(load_images("imagefolder", tmp_path, 16), 10)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert sorted(images[:, 0, 0, 0].tolist()) == [0, 80, 160]


# ---- sample_images: the pre-flight's one image of each file or split -----------------------------

def test_sample_images_reads_the_first_image_of_each_cifar10_batch(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    write_cifar10(tmp_path, images)
    sampled = sample_images("cifar10", tmp_path, 32)
    assert torch.equal(sampled, torch.from_numpy(images[::2]).permute(0, 3, 1, 2))  # batches of 2: 0, 2, ...


def test_sample_images_reads_the_first_stl10_image_upright_at_the_resolution_asked(tmp_path):
    images = stl10_images()
    write_stl10(tmp_path, images)
    loaded = every_image(load_images("stl10", tmp_path, 48))
    assert torch.equal(sample_images("stl10", tmp_path, 48), loaded[:1])


def test_sample_images_names_a_cifar10_batch_of_another_format(tmp_path):
    write_cifar10(tmp_path, np.zeros((5, 32, 32, 3), np.uint8))
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": [1, 2]}, protocol=2))
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: expected a dict whose b'data' is an \(N, "):
        sample_images("cifar10", tmp_path, 32)


def test_a_zero_byte_image_is_refused_at_load_naming_the_file_not_when_a_batch_draws_it(tmp_path):
    (tmp_path / "a").mkdir()
    coordinate_image(40, 40).save(tmp_path / "a" / "fine.png")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetFormatError, match=r"imagefolder: 1 empty \(zero-byte\) image file\(s\) among "
                                                 r"the 2: .*a/empty\.jpg; remove or replace them"):
        load_images("imagefolder", tmp_path, 32)


def test_a_data_root_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "a-file").write_text("")
    for dataset in ("cifar10", "imagefolder"):
        with pytest.raises(DatasetNotFoundError, match="a-file. data_root is a file; it must be the folder"):
            sample_images(dataset, tmp_path / "a-file", 32)
    assert sample_images("digits", tmp_path / "a-file", 32).shape == (1, 3, 32, 32)  # digits needs no root
