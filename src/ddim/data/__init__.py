"""Training data for the ε-model: images scaled to [-1, 1] as (C, H, W) float tensors, with labels.

``build_dataset(name, root=..., image_size=..., split=...)`` reads the data sets in ``DATASETS``: the paper's
(cifar10, celeba, lsun church/bedroom), any folder of images, and ``digits``: scikit-learn's bundled 8x8
digits, the embedded default so that ``python train.py`` runs with no download.  Each entry is a ``DataSpec``: its
reader and the defaults train.py and evaluate.py take for it, so a new data set is one function and one entry.
Preprocessing follows the official DDIM code: CelebA's centre crop (cx=89, cy=121, 128x128) then
resize, random horizontal flip, optional uniform dequantisation, x -> 2x - 1.  The random parts are drawn in one
place (``_Transformed``), from a generator seeded by (seed, epoch, image index) when the key comes from
``EpochSeededSampler``: a sample's flip and noise then do not depend on the number of data-loader workers, nor on the
step a run was resumed at.  ``image_grid`` lays images out for viewing (the grids train.py and evaluate.py write).
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import lightning as L
import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset

from ddim.config import as_bool, check_int_at_least, check_known_keys, check_positive_int
from ddim.diffusion import TRAJECTORIES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# every setting of a conf/dataset file (train_steps is train.py's default trainer.max_steps); another key is refused
DATASET_KEYS = ("name", "root", "image_size", "channels", "split", "batch_size", "num_workers", "random_flip",
                "uniform_dequantization", "download", "category", "train_steps")
LSUN_SPLITS = {"train": "train", "val": "val", "valid": "val", "test": "val"}  # LSUN ships train and val only
LSUN_CATEGORY = "church_outdoor"  # dataset.category when none is given
PAPER_FID_SAMPLES = 50_000  # FID's sample count in the paper: fid.num_samples=null unless a DataSpec says


class SplitError(ValueError):
    """A split the data set does not have; evaluate.py names it under the setting that chose the split."""


class Reader(Protocol):
    """A data set's reader, one signature for all (k-diffusion's style), so ``build_dataset`` calls any of them the
    same way: a Dataset of (image in [-1, 1] as (C, H, W), label) read from ``root``; a split it lacks raises
    ``SplitError``, missing files a FileNotFoundError naming the paths looked at.  ``channels`` and ``category``
    default for the readers that ignore them."""

    def __call__(self, root: Path, split: str, image_size: int, random_flip: bool, uniform_dequantization: bool,
                 download: bool, channels: int = 3, category: str = LSUN_CATEGORY) -> Dataset: ...


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s random preprocessing in epoch ``epoch`` of a run seeded ``seed``: a hash, so
    that nearby keys give unrelated generators."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Transformed(Dataset):
    """(image in [-1, 1], label) from a data set of (PIL image or [0, 1] tensor, label): ``transform`` (PIL ->
    tensor), then the official random preprocessing: horizontal flip, uniform dequantisation
    (x*255/256 + U(0, 1/256), the official ``data_transform``), and x -> 2x - 1.

    The key is an index, or an (index, seed) pair as ``EpochSeededSampler`` yields: with a seed, the flip and the
    noise come from a generator seeded with it, so they are the same in any worker process and after a resume;
    with a bare index, from torch's global random state (a plain shuffled DataLoader)."""

    def __init__(self, base: Dataset, transform: Callable | None = None, random_flip: bool = False,
                 uniform_dequantization: bool = False):
        self.base = base
        self.transform = transform
        # a string such as "no" would be truthy: only true/false
        self.random_flip = as_bool(random_flip, "dataset.random_flip")
        self.uniform_dequantization = as_bool(uniform_dequantization, "dataset.uniform_dequantization")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.base[index]
        x = self.transform(img) if self.transform is not None else img
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if self.random_flip and torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        if self.uniform_dequantization:
            x = x / 256.0 * 255.0 + torch.rand(x.shape, generator=gen) / 256.0
        return 2.0 * x - 1.0, label


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, no download), upscaled bilinearly to ``image_size``,
    as ([0, 1] tensor, label) (``build_dataset`` wraps it in ``_Transformed``).

    The sklearn split is not official: "train" is the first 90 %, "test" the rest, "all" everything.
    """

    def __init__(self, image_size: int = 16, channels: int = 1, split: str = "train"):
        if channels not in (1, 3):
            raise ValueError(f"digits: channels must be 1 or 3, got {channels}")
        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
        y = torch.from_numpy(d.target.astype(np.int64))
        n_train = int(0.9 * len(x))
        if split == "train":
            x, y = x[:n_train], y[:n_train]
        elif split == "test":
            x, y = x[n_train:], y[n_train:]
        elif split != "all":
            raise SplitError(f"digits: split must be 'train', 'test' or 'all', got {split!r}")
        if image_size != 8:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = x.clamp(0, 1).repeat(1, channels, 1, 1)
        self.labels = y

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class ArrayImages(Dataset):
    """Images held in memory as one uint8 (N, H, W, C) array, with labels: a decoded data set (e.g. the JPEG
    CIFAR-10 copy decoded once), so a step reads no files and decodes nothing.  Gives ([0, 1] tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W) view
        self.labels = torch.from_numpy(np.asarray(labels).astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i].float() / 255.0, int(self.labels[i])


CIFAR10_HELP = ("Set dataset.download=true where the internet is reachable (torchvision's cifar-10-batches-py), or "
                "put decoded arrays there: cifar10_train.npz / cifar10_test.npz with x (uint8, N x 32 x 32 x 3) and y "
                "(labels), e.g. a JPEG copy of CIFAR-10 decoded once")


def cifar10_dataset(root: Path, split: str, image_size: int, random_flip: bool, uniform_dequantization: bool,
                    download: bool, channels: int = 3, category: str = LSUN_CATEGORY) -> Dataset:
    """CIFAR-10 from ``root``: decoded arrays ``cifar10_<split>.npz`` (x uint8 NHWC, y) when present, else
    torchvision's ``cifar-10-batches-py`` (downloaded with ``download``).  torchvision checks the downloaded
    archive's MD5 and, on every load, each batch file's: a corrupt or partial copy is refused, not read."""
    if split not in ("train", "test"):
        raise SplitError(f"cifar10: split must be 'train' or 'test', got {split!r}")
    arrays = root / f"cifar10_{split}.npz"
    if arrays.is_file():
        with np.load(arrays) as d:
            if "x" not in d or "y" not in d:
                raise ValueError(f"{arrays} must hold arrays x (uint8, N x H x W x 3) and y (labels); it has "
                                 f"{sorted(d.files)}")
            images, labels = d["x"], d["y"]
        if images.shape[1:3] != (image_size, image_size):
            raise ValueError(f"{arrays} holds {images.shape[1]}x{images.shape[2]} images; dataset.image_size="
                             f"{image_size} (allowed here: {images.shape[1]})")
        return _Transformed(ArrayImages(images, labels), None, random_flip, uniform_dequantization)
    if not (root / "cifar-10-batches-py").is_dir() and not download:
        raise FileNotFoundError(f"CIFAR-10 not found: neither {root / 'cifar-10-batches-py'} nor {arrays} exists. "
                                f"{CIFAR10_HELP}.")
    try:
        base = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise RuntimeError(f"CIFAR-10 in {root} could not be {'downloaded or ' if download else ''}read ({e}): no "
                           f"internet, or a corrupt copy (torchvision checks each file's MD5)? {CIFAR10_HELP}.") from e
    return _Transformed(base, _default_transform(image_size, crop=False), random_flip, uniform_dequantization)


class ImageFolderFlat(Dataset):
    """Every image file under ``root`` (recursively, sorted); label = index of its parent folder name.  ``mode``:
    PIL's "RGB", or "L" for grey (``dataset.channels=1``)."""

    def __init__(self, root: Path, files: list[Path] | None = None, mode: str = "RGB"):
        self.root, self.mode = Path(root), mode
        self.files = files if files is not None else sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        classes = sorted({p.parent.name for p in self.files})
        self.class_to_idx = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        p = self.files[i]
        with Image.open(p) as im:
            img = im.convert(self.mode)
        return img, self.class_to_idx[p.parent.name]


CELEBA_HELP = ("CelebA: download 'img_align_celeba.zip' and 'list_eval_partition.txt' from "
               "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (or Google Drive) and arrange "
               "<root>/celeba/img_align_celeba/*.jpg and <root>/celeba/list_eval_partition.txt")


def _celeba_files(root: Path, split: str) -> list[Path]:
    """The standard CelebA layout, read directly (no md5 check, unlike torchvision.datasets.CelebA)."""
    base = root / "celeba" if (root / "celeba").is_dir() else root
    img_dir = base / "img_align_celeba"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"CelebA images not found: neither {root / 'celeba' / 'img_align_celeba'} nor "
                                f"{root / 'img_align_celeba'} exists (dataset.root={root}). {CELEBA_HELP}")
    splits = {"train": 0, "valid": 1, "val": 1, "test": 2}
    if split == "all":
        return sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if split not in splits:
        raise SplitError(f"celeba: split must be one of {sorted(splits) + ['all']}, got {split!r}")
    part = base / "list_eval_partition.txt"
    if not part.is_file():
        raise FileNotFoundError(f"CelebA split file not found: {part}. {CELEBA_HELP}")
    files = []
    for line in part.read_text().split("\n"):
        fields = line.split()
        if len(fields) == 2 and int(fields[1]) == splits[split]:
            files.append(img_dir / fields[0])
    if not files:
        raise SplitError(f"celeba: no images of split {split!r} listed in {part}")
    return files


def celeba_transform(image_size: int) -> Callable:
    """The official crop: the 128x128 box around (cx=89, cy=121) of the 178x218 aligned image, then resize."""
    cx, cy = 89, 121
    top, left = cy - 64, cx - 64
    return T.Compose([T.Lambda(lambda im: im.crop((left, top, left + 128, top + 128))), T.Resize(image_size),
                      T.ToTensor()])


def _default_transform(image_size: int, crop: bool) -> Callable:
    steps: list[Any] = [T.Resize(image_size)]
    if crop:
        steps.append(T.CenterCrop(image_size))
    steps.append(T.ToTensor())
    return T.Compose(steps)


def digits_dataset(root: Path, split: str, image_size: int, random_flip: bool, uniform_dequantization: bool,
                   download: bool, channels: int = 3, category: str = LSUN_CATEGORY) -> Dataset:
    """scikit-learn's bundled digits (``DigitsDataset``): ``root`` is unused, nothing is downloaded."""
    return _Transformed(DigitsDataset(image_size=image_size, channels=channels, split=split), None, random_flip,
                        uniform_dequantization)


def celeba_dataset(root: Path, split: str, image_size: int, random_flip: bool, uniform_dequantization: bool,
                   download: bool, channels: int = 3, category: str = LSUN_CATEGORY) -> Dataset:
    """CelebA from ``root/celeba/img_align_celeba`` (or ``root/img_align_celeba``) with the official crop."""
    files = _celeba_files(root, split)
    return _Transformed(ImageFolderFlat(root, files), celeba_transform(image_size), random_flip,
                        uniform_dequantization)


def lsun_dataset(root: Path, split: str, image_size: int, random_flip: bool, uniform_dequantization: bool,
                 download: bool, channels: int = 3, category: str = LSUN_CATEGORY) -> Dataset:
    """LSUN ``category`` from ``root/<category>_<split>_lmdb``, or from an image folder ``root/<category>`` (which
    has no splits: every split is all its images)."""
    if split not in LSUN_SPLITS:
        raise SplitError(f"lsun: split must be one of {sorted(LSUN_SPLITS)} (val, valid and test all read the val "
                         f"lmdb), got {split!r}")
    lmdb_dir = root / f"{category}_{LSUN_SPLITS[split]}_lmdb"
    folder = root / category
    tf = _default_transform(image_size, crop=True)
    if lmdb_dir.is_dir():
        base = torchvision.datasets.LSUN(str(root), classes=[lmdb_dir.name[:-5]])
        return _Transformed(base, tf, random_flip, uniform_dequantization)
    if folder.is_dir():
        return _Transformed(ImageFolderFlat(folder), tf, random_flip, uniform_dequantization)
    raise FileNotFoundError(
        f"LSUN {category} not found: neither {lmdb_dir} (lmdb) nor {folder} (image folder) exists. Download with "
        f"https://github.com/fyu/lsun (python download.py -c {category}) and unzip into {root}.")


def image_folder_dataset(root: Path, split: str, image_size: int, random_flip: bool, uniform_dequantization: bool,
                         download: bool, channels: int = 3, category: str = LSUN_CATEGORY) -> Dataset:
    """Every image under ``root`` (any depth), centre-cropped; no splits: every split is all the images."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}. Point dataset.root at a folder of images "
                                f"(any depth, e.g. <root>/<class>/<image>.jpg).")
    base = ImageFolderFlat(root, mode="L" if channels == 1 else "RGB")
    if len(base) == 0:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return _Transformed(base, _default_transform(image_size, crop=True), random_flip, uniform_dequantization)


@dataclass(frozen=True)
class DataSpec:
    """A named data set: its reader and the defaults that depend on the data set, in one place so that train.py
    and evaluate.py need no table of their own.

    grey: ``dataset.channels=1`` is allowed (the reader can give grey images).
    data_subdir: where its files lie under ``paths.data_dir`` (the ``root:`` of ``conf/dataset/<name>.yaml``);
    evaluate.py looks there when the checkpoint records no root.
    by_place: its images are known only by their folder (``dataset.root``, no default): the checkpoint records the
    folder, and evaluation records and reference statistics are keyed by it.
    fid_samples: FID's sample count for ``fid.num_samples=null``.
    trajectory: the τ spacing the paper used for it (Appendix D.2), evaluate.py's ``sampler.trajectory=null``.
    """

    read: Reader
    grey: bool = False
    data_subdir: str = ""
    by_place: bool = False
    fid_samples: int = PAPER_FID_SAMPLES
    trajectory: str = "linear"

    def __post_init__(self) -> None:
        check_positive_int(self.fid_samples, "DataSpec.fid_samples")
        canonical = sorted(set(TRAJECTORIES.values()))  # records name τ by these, not by ddim.diffusion's aliases
        if self.trajectory not in canonical:
            raise ValueError(f"DataSpec.trajectory={self.trajectory!r}; allowed: {', '.join(canonical)}")


DATASETS: dict[str, DataSpec] = {
    "digits": DataSpec(digits_dataset, grey=True, fid_samples=1000),  # FID a CPU can finish: a check, not the paper's
    "cifar10": DataSpec(cifar10_dataset, data_subdir="cifar10", trajectory="quadratic"),
    "celeba": DataSpec(celeba_dataset),
    "lsun": DataSpec(lsun_dataset, data_subdir="lsun"),
    "image_folder": DataSpec(image_folder_dataset, grey=True, by_place=True),
}


def grey_dataset_names() -> str:
    """The names in DATASETS that allow ``channels=1``, as a message reads them ("digits and image_folder")."""
    names = [name for name, spec in DATASETS.items() if spec.grey]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names) or "none"


def data_folder(data: dict) -> str | None:
    """The absolute folder of a data set known by its place (``DataSpec.by_place``: image_folder), from a dataset
    config or a checkpoint's data record; None for the other data sets (their place is under paths.data_dir)."""
    spec = DATASETS.get(data.get("name"))
    root = data.get("root") if spec is not None and spec.by_place else None
    return str(Path(root).expanduser().resolve()) if root else None


def build_dataset(name: str, *, root: str | Path = "data", image_size: int = 32, split: str = "train",
                  random_flip: bool = True, uniform_dequantization: bool = False, download: bool = False,
                  channels: int = 3, category: str = LSUN_CATEGORY, **unused: Any) -> Dataset:
    """A Dataset of (image in [-1, 1], label) for ``name`` in DATASETS, read by its ``DataSpec.read``.

    root: folder holding the data, laid out as its reader's docstring says (``cifar10_dataset``, ...).
    split: "train" or "test" ("valid" for celeba/lsun val); a name the data set lacks raises SplitError.
    image_folder, and LSUN read from an image folder, have no splits: every split is all the images.
    channels: 3, or 1 (grey) where the DataSpec allows grey (digits and image_folder).
    """
    check_known_keys(unused, DATASET_KEYS, "dataset")  # the data module's own (batch_size, ...) pass; a typo does not
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if channels not in ((1, 3) if spec.grey else (3,)):
        raise ValueError(f"dataset.channels={channels} for dataset={name}; allowed: 3 (RGB), or 1 (grey) for "
                         f"{grey_dataset_names()}")
    return spec.read(root=Path(root).expanduser(), split=split, image_size=image_size, random_flip=random_flip,
                     uniform_dequantization=uniform_dequantization, download=download, channels=channels,
                     category=category)


VIEW_MIN_SIZE = 32  # grids are for looking at: smaller images (digits' 8 px) are enlarged to at least this


def image_grid(images: torch.Tensor, nrow: int, min_size: int | None = None) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] as one (C, H', W') grid, ``nrow`` per row, 2-pixel white padding.  Images
    smaller than ``min_size`` pixels (default ``VIEW_MIN_SIZE``) are enlarged by the smallest whole factor that
    reaches it, nearest neighbour, so every pixel stays a square; samples and scores keep the native size."""
    factor = -(-(min_size or VIEW_MIN_SIZE) // min(images.shape[-2:]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    return torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def image_file(dataset: Dataset, i: int) -> Path | None:
    """The file behind item ``i`` of a (wrapped) image-folder data set, found through ``base`` / ``dataset``
    wrappers down to a ``files`` list; None for data sets not read from single files (npz arrays, lmdb)."""
    ds = dataset
    while ds is not None:
        files = getattr(ds, "files", None)
        if isinstance(files, Sequence) and len(files) == len(dataset):
            return Path(files[i])
        ds = getattr(ds, "base", None) or getattr(ds, "dataset", None)
    return None


class NamedFailures(Dataset):
    """A data set whose unreadable items (a truncated JPEG in an image folder) fail with their index and file, not
    with a decoder's message that names neither.  Keys may be ``EpochSeededSampler``'s (index, seed) pairs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        try:
            return self.dataset[key]
        except Exception as e:  # noqa: BLE001 - any decode error: say which image it was
            i = key[0] if isinstance(key, tuple) else key
            name = image_file(self.dataset, i)
            raise ValueError(f"image {i} of {len(self.dataset)}{f' ({name})' if name else ''} cannot be read: "
                             f"{type(e).__name__}: {e}; remove or replace the file") from e


class EpochSeededSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """A random permutation drawn from (seed, epoch), this rank's share of it, from a resumable position, as
    (index, ``sample_seed(seed, epoch, index)``) pairs: ``_Transformed`` draws the image's flip and noise from the
    seed, so the whole batch, not only the order, is the same however many workers load it and wherever a run
    was resumed.

    The sampler counts its own epochs and position: ``advance`` (called by ``DiffusionDataModule`` for each batch
    a training step takes, not for batches that workers fetch ahead) moves the position on and starts the next
    epoch once less than a batch is left.  ``state_dict`` holds (epoch, position), so a run resumed at any step
    goes on with the next unseen sample of the same order (Lightning's epoch number is not used: in a checkpoint
    written when training ended mid-epoch it already counts the next epoch).  Under several processes each rank
    takes every ``num_replicas``-th index of the permutation (the tail that does not divide evenly is dropped, as
    DistributedSampler's drop_last does), so every rank has the same number of batches."""

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, batch_size: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.n, self.seed = n, int(seed)
        self.num_replicas, self.rank, self.batch_size = int(num_replicas), int(rank), int(batch_size)
        self.epoch, self.consumed = 0, 0

    def seek(self, epoch: int, consumed: int = 0) -> None:
        """Go to sample ``consumed`` (of this rank's share) of epoch ``epoch``."""
        self.epoch, self.consumed = int(epoch), int(consumed)

    def advance(self, count: int) -> None:
        """``count`` more samples were taken by training; past the last whole batch, the next epoch begins."""
        self.consumed += int(count)
        if len(self) - self.consumed < self.batch_size:
            self.seek(self.epoch + 1)

    def __len__(self) -> int:
        """This rank's samples in a whole epoch (Lightning counts an epoch's batches from it; resumed mid-epoch, it
        starts counting at the batches already taken, so this stays the whole epoch's)."""
        return self.n // self.num_replicas

    def __iter__(self):
        seed, epoch = self.seed, self.epoch  # fixed now: ``advance`` may start the next epoch while this one is read
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g)[self.rank:len(self) * self.num_replicas:self.num_replicas]
        return ((i, sample_seed(seed, epoch, i)) for i in order[self.consumed:].tolist())

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed, "n": self.n,
                "num_replicas": self.num_replicas, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Go on from ``state``.  Taken with another data set size, seed, number of ranks or batch size, the resume
        cannot be exact: a warning says so and the run goes on near the same share of the epoch."""
        mine = {"seed": self.seed, "n": self.n, "num_replicas": self.num_replicas, "batch_size": self.batch_size}
        theirs = {k: state.get(k) for k in mine}
        consumed = int(state["consumed"])
        if theirs != mine:
            warnings.warn(f"the checkpoint's data position was taken with {theirs}, this run has {mine}: the resumed "
                          f"run cannot see the data order of an uninterrupted one", stacklevel=2)
            consumed = consumed * int(theirs["num_replicas"] or 1) // self.num_replicas
            consumed = min(consumed, len(self)) // self.batch_size * self.batch_size
        self.seek(state["epoch"], consumed)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose ``state_dict`` is its ``EpochSeededSampler``'s: Lightning saves it in every checkpoint
    and restores it on resume (its interface for resumable loaders)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class DiffusionDataModule(L.LightningDataModule):
    """Shuffled, drop-last training batches; seeded and resumable, so that a run resumed at any step sees the
    batches of the uninterrupted run (order, flips and dequantisation noise), whatever ``num_workers``.  Several
    processes: every rank takes its own share (``EpochSeededSampler``; the Trainer's ``use_distributed_sampler``
    must be off, which train.py sets)."""

    def __init__(self, name: str = "digits", root: str = "data", image_size: int = 16, batch_size: int = 64,
                 num_workers: int = 0, split: str = "train", random_flip: bool = True,
                 uniform_dequantization: bool = False, download: bool = False, channels: int = 3,
                 category: str = LSUN_CATEGORY, seed: int = 0, **unused: Any):
        super().__init__()
        check_known_keys(unused, DATASET_KEYS, "dataset")  # a key no code reads would be dropped without a word
        check_positive_int(image_size, "dataset.image_size")
        check_positive_int(batch_size, "dataset.batch_size")
        check_positive_int(channels, "dataset.channels")
        check_int_at_least(num_workers, "dataset.num_workers", 0)
        as_bool(random_flip, "dataset.random_flip")  # refused here, before setup reads any data
        as_bool(uniform_dequantization, "dataset.uniform_dequantization")
        self.save_hyperparameters()
        self.dataset: Dataset | None = None
        self.sampler: EpochSeededSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        h = self.hparams
        # a file that cannot be decoded is named (index, path) when a step reads it
        self.dataset = NamedFailures(build_dataset(h.name, root=h.root, image_size=h.image_size, split=h.split,
                                     random_flip=h.random_flip, uniform_dequantization=h.uniform_dequantization,
                                     download=h.download, channels=h.channels, category=h.category))
        if h.batch_size > len(self.dataset):
            raise ValueError(f"batch_size={h.batch_size} is larger than the {h.name} data set ({len(self.dataset)} "
                             f"images at {h.root}); lower dataset.batch_size or add data")

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self.sampler = EpochSeededSampler(len(self.dataset), self.hparams.seed, replicas, rank,
                                          self.hparams.batch_size)
        # the workers' base seed comes from this generator, not from the global one: creating the iterator at a
        # resume (mid-epoch) then draws nothing from the RNG stream the training steps use
        workers_seed = torch.Generator().manual_seed(self.hparams.seed)
        return ResumableDataLoader(self.dataset, batch_size=self.hparams.batch_size, sampler=self.sampler,
                                   drop_last=True, num_workers=self.hparams.num_workers, generator=workers_seed,
                                   persistent_workers=self.hparams.num_workers > 0,
                                   pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the samples a training step takes (fetched-ahead batches are not counted)."""
        trainer = self.trainer
        if self.sampler is not None and trainer is not None and trainer.training:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.sampler.advance(int(x.shape[0]))
        return batch
