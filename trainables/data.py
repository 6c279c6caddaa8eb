"""Training images: a dataset on disk -> uint8 images at one resolution -> seeded batches in [-1, 1].

`load_images(dataset, root, resolution, split=...)` returns an `ImageSource`: (B, 3, R, R) uint8 images by
index, and the name of the subset it holds (`split`, for the reference statistics' cache key).
`sample_images` reads one image of each file or split instead, as training would, without loading the dataset:
the study's pre-flight check that the data is there and readable.
`BatchSampler` draws training batches from it, uniformly at random with replacement, from a CPU
`torch.Generator` whose state goes into the trial's checkpoint. `real_images` gives the real images that the
FID/IS/KID reference statistics are computed from.

Datasets (names as trainables.config.DATASETS; `root` is TrialConfig.data_root, laid out as torchvision does):

===========  =========================================  ==================================================
name         files under root                           images
===========  =========================================  ==================================================
digits       none (scikit-learn's bundled load_digits)  1,797 8x8 digits, 0..16 scaled to 0..255
cifar10      cifar-10-batches-py/data_batch_{1..5}      the 50k training images, 32 px
stl10        stl10_binary/unlabeled_X.bin               the 100k unlabeled images, 96 px (48 px in the
                                                        paper)
celeba       celeba/img_align_celeba/*.jpg (and         all 202,599 aligned faces as the paper (split
             celeba/list_eval_partition.txt for a       "all"), or one partition (train 162,770, valid,
             split)                                     test); centre crop 128 px (64 px in the paper)
imagefolder  root/<class>/<image> (ImageNet train, ..)  centre square crop (128 px in the paper)
mnist        MNIST/raw/train-images-idx3-ubyte (or .gz)  the 60k training digits, zero-padded 28 -> 32 px
===========  =========================================  ==================================================

Each is then resized to the resolution asked. Resizing follows the official preprocessing (fjxmlzn/BSN:
`cv2.resize`, INTER_LINEAR): a reduction by an exact integer factor k is the mean of each k x k block (what
INTER_LINEAR computes at k = 2, the paper's 96 -> 48 and 128 -> 64); any other size is bilinear with
antialiasing. Values are rounded half up. Gray images are replicated to 3 channels.
"""

from __future__ import annotations

import abc
import codecs
import functools
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.datasets.utils import download_and_extract_archive, extract_archive
from torchvision.io import ImageReadMode, decode_image

from trainables.config import CELEBA_SPLITS, DATASETS, check_batch_size

CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
STL10_IMAGE_BYTES = 3 * 96 * 96
CELEBA_CROP = 128  # px: the official centre crop of the 178 x 218 aligned faces
CELEBA_PARTITIONS = {"train": "0", "valid": "1", "test": "2"}  # the codes of list_eval_partition.txt
MNIST_PADDED = 32  # px: 2 zero (background) pixels per side of MNIST's 28 px digits; no interpolation
MNIST_RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
_RESIZE_CHUNK = 256  # images resized at a time: bounds the float32 working memory of preparation


class ImageDecodeError(RuntimeError, ValueError):
    """An image file that cannot be decoded (empty, truncated, not an image): bad input, met on every read."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they should be; the message says where and how to get them."""

    def __init__(self, dataset: str, path: Path, how: str):
        super().__init__(f"dataset {dataset!r} not found: expected {path}. {how}")
        self.dataset = dataset
        self.path = path
        self.how = how

    def __reduce__(self):  # Ray pickles a trial's exception; the default would call __init__(message)
        return type(self), (self.dataset, self.path, self.how)


class DatasetFormatError(ValueError):
    """A dataset's files are there but not of its format (an empty image, a wrong size); names the file."""


class ImageSource(abc.ABC):
    """One dataset at one resolution: images by index as (B, 3, R, R) uint8 (0..255, RGB)."""

    name: str  # dataset name, as trainables.config.DATASETS
    resolution: int  # R, pixels per side
    split: str = "train"  # the subset held: "train" (the training images), CelebA's CELEBA_SPLITS

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def uint8(self, indices: torch.Tensor) -> torch.Tensor:
        """Images at `indices` ((B,) int64, each in [0, len)) as a new (B, 3, R, R) uint8 CPU tensor."""


class InMemoryImages(ImageSource):
    """Images decoded and resized once, held as one (N, C, R, R) uint8 tensor, C = 1 (gray) or 3.

    Memory: N * C * R^2 bytes: cifar10 154 MB, stl10 at 48 px 691 MB, mnist at 32 px 61 MB, digits 1.8 MB.
    """

    def __init__(self, name: str, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            got = f"{tuple(images.shape)} {images.dtype}"
            raise ValueError(f"images: must be (N, 1 or 3, R, R) uint8, got {got}")
        self.name = name
        self.resolution = images.shape[-1]
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def uint8(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices].expand(-1, 3, -1, -1).contiguous()


class ImageFiles(ImageSource):
    """Image files, decoded and centre-cropped per call on a thread pool (decoding frees the GIL), resized.

    Memory: the list of paths only, about 150 bytes a file (CelebA ~25 MB, ImageNet's 1.28M files ~200 MB).
    `crop`: side of the centre square cut before resizing, in px; None: the largest one (the shorter side).
    An empty (zero-byte) file is refused here, naming it, rather than when a batch first draws it.
    """

    def __init__(self, name: str, paths: list[str], resolution: int, crop: int | None, split: str = "train"):
        empty = [path for path in paths if os.stat(path).st_size == 0]  # one stat a file: ~1 s per 1M
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise DatasetFormatError(f"{name}: {len(empty)} empty (zero-byte) image file(s) among the "
                                     f"{len(paths)}: {shown}; remove or replace them")
        self.name = name
        self.resolution = resolution
        self.split = split
        self.paths = paths
        self.crop = crop
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def uint8(self, indices: torch.Tensor) -> torch.Tensor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        crops = self._pool.map(self._decode_crop, [self.paths[i] for i in indices.tolist()])
        # Resized here, not in the pool: torch ops in pool threads would each start intra-op thread teams.
        images = [resize_square(crop[None], self.resolution)[0] for crop in crops]
        if not images:
            return torch.empty((0, 3, self.resolution, self.resolution), dtype=torch.uint8)
        return torch.stack(images)

    def _decode_crop(self, path: str) -> torch.Tensor:
        """The file's centre square: (3, S, S) uint8."""
        try:
            # EXIF orientation applied: the image the right way up, as viewers show it.
            image = decode_image(path, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError as exc:
            raise ImageDecodeError(f"{self.name}: cannot decode {path}: {exc}") from exc
        height, width = image.shape[-2:]
        side = min(height, width) if self.crop is None else self.crop
        if side > min(height, width):
            raise ValueError(f"{self.name}: {path} is {width}x{height} px, smaller than the {side} px crop")
        top, left = (height - side) // 2, (width - side) // 2  # as the official code: odd pixel bottom/right
        return image[:, top:top + side, left:left + side]


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) uint8 -> (N, C, size, size) uint8, with the filter of the module docstring."""
    side = images.shape[-1]
    if side == size:
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start:start + _RESIZE_CHUNK].float()
        if side % size == 0:
            chunk = F.avg_pool2d(chunk, side // size)
        else:
            chunk = F.interpolate(chunk, (size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + _RESIZE_CHUNK] = chunk.add_(0.5).floor_().clamp_(0, 255)
    return out


def load_images(
    dataset: str, root: str | Path, resolution: int, *, download: bool = False, split: str = "all"
) -> ImageSource:
    """The training images of `dataset` at `resolution` px, prepared once per process (cached by arguments).

    split: CelebA's images, one of trainables.config.CELEBA_SPLITS ("all": every aligned face, as the paper);
    every other dataset has one set of training images, "all" (the source's `split` names it "train").
    Raises ValueError for an unknown dataset or split or a resolution <= 0, and DatasetNotFoundError when the
    files are missing (after trying torchvision's downloader, when `download` allows it).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution: must be an int > 0 (pixels per side), got {resolution!r}")
    return _load_cached(dataset, _checked_root(dataset, root, split), resolution, download, split)


def sample_images(dataset: str, root: str | Path, resolution: int, *, split: str = "all") -> torch.Tensor:
    """One image of each file or split that `dataset` is read from, as training reads it: (F, 3, R, R) uint8.

    CIFAR-10: the first image of each of its 5 batches; STL-10: its first image; the image-file datasets
    (CelebA, imagefolder): their first image, every file checked to be non-empty; digits, MNIST: the first
    image of the loaded set. Seconds, where load_images would read STL-10 whole. Raises as load_images does
    (nothing is downloaded): DatasetNotFoundError, DatasetFormatError, ValueError, RuntimeError for an
    undecodable image.
    """
    path = _checked_root(dataset, root, split)
    if dataset == "cifar10":
        firsts = [_read_cifar10_batch(batch)[:1] for batch in _cifar10_batches(path, download=False)]
        images = torch.from_numpy(np.concatenate(firsts)).reshape(-1, 3, 32, 32)
    elif dataset == "stl10":
        with open(_stl10_file(path, download=False), "rb") as file:
            stored = np.frombuffer(file.read(STL10_IMAGE_BYTES), np.uint8).reshape(1, 3, 96, 96)
        images = torch.from_numpy(np.ascontiguousarray(stored.transpose(0, 1, 3, 2)))
    else:
        return load_images(dataset, root, resolution, split=split).uint8(torch.tensor([0]))
    return resize_square(images, resolution)


def _checked_root(dataset: str, root: str | Path, split: str) -> Path:
    """`root` resolved, once the dataset and split are known and root is no file (digits needs no root)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: unknown {dataset!r}; valid: {', '.join(DATASETS)}")
    valid_splits = CELEBA_SPLITS if dataset == "celeba" else ("all",)
    if split not in valid_splits:
        raise ValueError(f"split: {split!r} is not a split of {dataset}; valid: {', '.join(valid_splits)}")
    path = Path(root).expanduser().resolve()
    if dataset != "digits" and path.exists() and not path.is_dir():
        raise DatasetNotFoundError(dataset, path, "data_root is a file; it must be the folder the dataset's "
                                                  "files are in")
    return path


@functools.lru_cache(maxsize=2)  # a trial loads one dataset; a second slot for a second resolution
def _load_cached(dataset: str, root: Path, resolution: int, download: bool, split: str) -> ImageSource:
    if dataset == "celeba":
        return _load_celeba(root, resolution, download, split)
    return _LOADERS[dataset](root, resolution, download)


def _load_digits(root: Path, resolution: int, download: bool) -> ImageSource:
    from sklearn.datasets import load_digits

    values = torch.from_numpy(load_digits().images)  # (1797, 8, 8) float64, integers 0..16
    images = (values * (255 / 16)).round().to(torch.uint8)[:, None]
    return InMemoryImages("digits", resize_square(images, resolution))


def _cifar10_batches(root: Path, download: bool) -> list[Path]:
    """The five training batch files, downloaded first when `download` allows and they are missing."""
    folder = root / torchvision.datasets.CIFAR10.base_folder
    if download and not all((folder / name).is_file() for name in CIFAR10_BATCHES):
        _download("cifar10", folder, torchvision.datasets.CIFAR10, root)
    missing = [name for name in CIFAR10_BATCHES if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            "cifar10", folder / "data_batch_{1..5}",
            f"Missing: {', '.join(missing)}. Extract {torchvision.datasets.CIFAR10.url} into {root}, "
            "or set download: true.",
        )
    return [folder / name for name in CIFAR10_BATCHES]


def _load_cifar10(root: Path, resolution: int, download: bool) -> ImageSource:
    # torchvision's CIFAR10 demands the official md5 sums and unpickles unrestricted: read the files here.
    batches = [_read_cifar10_batch(path) for path in _cifar10_batches(root, download)]
    images = torch.from_numpy(np.concatenate(batches)).reshape(-1, 3, 32, 32)  # R, G, B planes, row-major
    return InMemoryImages("cifar10", resize_square(images, resolution))


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's batch pickles hold: dicts, lists, bytes, ints and uint8 numpy arrays."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's array rebuild function, wherever it lives
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the official (Python 2, numpy 1) files
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR-10 format")
        return self.ALLOWED[module, name]


def _read_cifar10_batch(path: Path) -> np.ndarray:
    """One data_batch file -> (N, 3072) uint8."""
    with open(path, "rb") as file:
        batch = _CifarUnpickler(file, encoding="bytes").load()  # bytes: Python 2's str keys become b"data"
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        raise DatasetFormatError(
            f"{path}: expected a dict whose b'data' is an (N, 3072) uint8 array, as CIFAR-10's")
    return data


def _stl10_file(root: Path, download: bool) -> Path:
    """unlabeled_X.bin, downloaded first when `download` allows and it is missing; checked to hold images."""
    path = root / torchvision.datasets.STL10.base_folder / "unlabeled_X.bin"
    if download and not path.is_file():
        _download("stl10", path, torchvision.datasets.STL10, root)
    if not path.is_file():
        raise DatasetNotFoundError(
            "stl10", path, f"Extract {torchvision.datasets.STL10.url} into {root}, or set download: true."
        )
    size = path.stat().st_size
    if size == 0 or size % STL10_IMAGE_BYTES:
        raise DatasetFormatError(f"{path}: {size} bytes is not a whole number (>= 1) of 96x96x3 images")
    return path


def _load_stl10(root: Path, resolution: int, download: bool) -> ImageSource:
    path = _stl10_file(root, download)
    # torchvision's STL10 demands the official md5 sums and holds all 2.8 GB at 96 px: read the file here.
    count = path.stat().st_size // STL10_IMAGE_BYTES
    out = torch.empty((count, 3, resolution, resolution), dtype=torch.uint8)
    with open(path, "rb") as file:  # read in chunks: only the resized images stay in memory
        for start in range(0, count, _RESIZE_CHUNK):
            stored = np.frombuffer(file.read(STL10_IMAGE_BYTES * _RESIZE_CHUNK), np.uint8)
            upright = np.ascontiguousarray(stored.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))  # col-major
            out[start:start + _RESIZE_CHUNK] = resize_square(torch.from_numpy(upright), resolution)
    return InMemoryImages("stl10", out)


def _load_celeba(root: Path, resolution: int, download: bool, split: str) -> ImageSource:
    """All aligned faces in file-name order (000001.jpg ... 202599.jpg, as the official preprocessing reads
    them), or those of one partition of list_eval_partition.txt."""
    folder = root / torchvision.datasets.CelebA.base_folder
    partition, images = folder / "list_eval_partition.txt", folder / "img_align_celeba"
    how = (
        "Get img_align_celeba.zip (extract it there) and list_eval_partition.txt from "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, or set download: true "
        "(needs gdown; Google Drive quotas often refuse it)."
    )
    needed = (images,) if split == "all" else (partition, images)
    if download and not all(path.exists() for path in needed):
        _download("celeba", folder, torchvision.datasets.CelebA, root)
    for path in needed:
        if not path.exists():
            raise DatasetNotFoundError("celeba", path, how)
    if split == "all":
        names = sorted(entry.name for entry in os.scandir(images) if entry.name.endswith(".jpg"))
        if not names:
            raise DatasetNotFoundError("celeba", images / "000001.jpg", how)
    else:
        # torchvision's CelebA demands md5 checksums of four annotation files we never use: read it here.
        rows = [line.split() for line in partition.read_text().splitlines()]  # "000001.jpg 0"
        names = [row[0] for row in rows if row[1:] == [CELEBA_PARTITIONS[split]]]
        if not names:
            raise ValueError(f"{partition}: no image in the {split} partition ({CELEBA_PARTITIONS[split]})")
        if not (images / names[0]).is_file():
            raise DatasetNotFoundError("celeba", images / names[0], how)
    return ImageFiles("celeba", [str(images / name) for name in names], resolution, crop=CELEBA_CROP,
                      split=split)


def _load_imagefolder(root: Path, resolution: int, download: bool) -> ImageSource:
    how = (
        "Point data_root at an ImageFolder tree, root/<class>/<image> (ImageNet: the extracted ILSVRC2012 "
        "training set, https://image-net.org/download.php); it cannot be downloaded automatically."
    )
    if not root.is_dir():
        raise DatasetNotFoundError("imagefolder", root, how)
    try:
        samples = torchvision.datasets.ImageFolder(str(root)).samples
    except FileNotFoundError as exc:
        raise DatasetNotFoundError("imagefolder", root, f"{exc} {how}") from exc
    return ImageFiles("imagefolder", [path for path, _ in samples], resolution, crop=None)


def _load_mnist(root: Path, resolution: int, download: bool) -> ImageSource:
    raw = root / "MNIST" / "raw"
    for name in MNIST_RAW_FILES:
        if not (raw / name).is_file() and (raw / f"{name}.gz").is_file():
            extract_archive(str(raw / f"{name}.gz"))  # torchvision reads them decompressed, as it leaves them
    missing = [name for name in MNIST_RAW_FILES if not (raw / name).is_file()]
    if missing and download:
        _download("mnist", raw, torchvision.datasets.MNIST, root)
        missing = [name for name in MNIST_RAW_FILES if not (raw / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            "mnist", raw,
            f"Missing: {', '.join(missing)} (or .gz). Get them from {torchvision.datasets.MNIST.mirrors[0]}, "
            "or set download: true.",
        )
    digits = torchvision.datasets.MNIST(str(root), train=True).data  # (60000, 28, 28) uint8
    pad = (MNIST_PADDED - digits.shape[-1]) // 2
    return InMemoryImages("mnist", resize_square(F.pad(digits[:, None], (pad,) * 4), resolution))


def _download(dataset: str, path: Path, cls: type, root: Path) -> None:
    """Fetch `dataset` into `root` with torchvision's downloader and the official checksums."""
    try:
        if hasattr(cls, "tgz_md5"):  # CIFAR10, STL10: one archive (their constructors would load all of it)
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        elif cls is torchvision.datasets.CelebA:
            cls(str(root), split="train", target_type=[], download=True)
        else:
            cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        raise DatasetNotFoundError(dataset, path, f"Download failed: {exc}") from exc


_LOADERS: dict[str, Callable[[Path, int, bool], ImageSource]] = {  # celeba, which takes a split: _load_cached
    "digits": _load_digits, "cifar10": _load_cifar10, "stl10": _load_stl10,
    "imagefolder": _load_imagefolder, "mnist": _load_mnist,
}


class BatchSampler:
    """Training batches drawn uniformly at random with replacement, reproducible from `seed`, resumable.

    The generator lives on the CPU whatever `device` is, so a checkpointed state resumes the same index stream
    on any machine; images travel to `device` as uint8 (4x less to copy) and become float32 there.
    """

    def __init__(self, source: ImageSource, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        check_batch_size(batch_size)
        if len(source) == 0:
            raise ValueError(f"source: dataset {source.name!r} has no images")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        """The next batch: (batch_size, 3, R, R) float32 in [-1, 1] on `device`."""
        indices = torch.randint(len(self.source), (self.batch_size,), generator=self.generator)
        images = self.source.uint8(indices)
        if self.device.type == "cuda":  # pinned + non_blocking: the copy does not wait for queued GPU work
            images = images.pin_memory().to(self.device, non_blocking=True)
        else:
            images = images.to(self.device)
        return images.float().div_(127.5).sub_(1.0)

    def state_dict(self) -> dict:
        """The generator state and what it belongs to; torch.save-able, loads with weights_only=True."""
        return {
            "generator": self.generator.get_state(),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "dataset": self.source.name,
            "resolution": self.source.resolution,
            "length": len(self.source),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved in `state`; ValueError when it was drawn with other data or settings."""
        current = self.state_dict()
        for key in ("dataset", "resolution", "length", "batch_size", "seed"):
            if state.get(key) != current[key]:
                saved = state.get(key)
                raise ValueError(f"state {key}: the checkpoint has {saved!r}, this sampler {current[key]!r}")
        self.generator.set_state(state["generator"].cpu())  # torch.load(map_location="cuda") moves it


def real_images(source: ImageSource, n: int, *, seed: int = 0) -> torch.Tensor:
    """`n` distinct images in a seeded random order, for reference statistics: (min(n, N), 3, R, R) uint8.

    When n exceeds the dataset's size N (digits has 1,797), all N images come back: check the first dimension.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be an int >= 1, got {n!r}")
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    return source.uint8(order[:n])
