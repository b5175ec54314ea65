"""Datasets for the proxy tasks: CIFAR-10 from the official python layout, and a synthetic set.

First step of the proxy flow (data -> models -> train): load_dataset returns normalised float32
tensors that train_proxy samples minibatches from, for the rejection stages and the search.

- "cifar10" reads DIR/cifar-10-batches-py/ (the official "CIFAR-10 python version"), downloading
  the official archive into DIR if the folder is absent. The proxy validation set is a seeded,
  held-out slice of the five training batches; the official test batch is never seen by the
  search and is read only by load_cifar10_test, for the final evaluation of chosen layers.
- "synthetic" is generated in-process: class-specific low-frequency colour/texture templates
  plus noise, learnable by a small CNN in a few dozen SGD steps, so tests and CI run offline
  and fast.
- "shakespeare" and "synthetic_text" are character-level text for the language-model proxy,
  loaded by evonas/proxy/text.py as a TextDataset (token ids, not images).

Decoded CIFAR-10 arrays are cached per folder for the life of the process, because a search
worker loads the dataset again for every candidate it evaluates. Batch files are unpickled
with an allow-list of the globals the official files reference, so a planted file cannot run
code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from evonas.errors import EvonasError
from evonas.proxy.text import TEXT_DATASETS, TextDataset, load_text_dataset, read_shakespeare

DATASETS = ("cifar10", "synthetic", *TEXT_DATASETS)
DATA_DIR_ENV = "EVONAS_DATA_DIR"

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
# Per-channel mean and standard deviation of the 50,000 training images (pixel values / 255).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_NUM_CLASSES = 10

_DOWNLOAD_TIMEOUT_S = 60.0
_FIX_HINT = f"pass --data-dir DIR or set {DATA_DIR_ENV} to a folder holding {CIFAR10_FOLDER}"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Normalised float32 images (N,3,32,32) and int64 labels of one proxy task.

    The tensors are shared with the in-process cache: treat them as read-only.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    name: str

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={len(self.train_y)}, val={len(self.val_y)}, "
                f"num_classes={self.num_classes})")


# Decoded uint8 images (N,3,32,32) and int64 labels, keyed by (resolved folder, file group),
# and the normalised splits built from them, keyed by (resolved folder, val_size, seed):
# normalising 50,000 images takes longer than reading the cached bytes.
_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_SPLITS: dict[tuple[str, int, int], Dataset] = {}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, val_size: int = 5000,
                 seed: int = 0, download: bool = True, n_train: int | None = None,
                 n_val: int | None = None) -> Dataset | TextDataset:
    """Load a proxy dataset by name ("cifar10", "synthetic", or a text set of text.py).

    cifar10: data_dir (or $EVONAS_DATA_DIR) is the folder holding cifar-10-batches-py, or that
    folder itself; val_size training images chosen by numpy Generator(seed) are held out as
    the validation set. synthetic: n_train (default 2048) and n_val (default 512) images made
    from seed; data_dir, val_size and download do not apply. shakespeare: data_dir (or
    $EVONAS_DATA_DIR) holds input.txt or tinyshakespeare.txt.gz; synthetic_text: made from seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EvonasError(f"dataset seed must be a non-negative integer, got {seed!r}")
    if name == "cifar10":
        if n_train is not None or n_val is not None:
            raise EvonasError("n_train/n_val apply to the synthetic dataset only: "
                              "use val_size to size the CIFAR-10 validation split")
        return _load_cifar10(data_dir, val_size=val_size, seed=seed, download=download)
    if name == "synthetic":
        return make_synthetic(n_train=2048 if n_train is None else n_train,
                              n_val=512 if n_val is None else n_val, seed=seed)
    if name in TEXT_DATASETS:
        if n_train is not None or n_val is not None:
            raise EvonasError(f"n_train/n_val apply to the synthetic image dataset only, "
                              f"not to {name}: leave them unset")
        return load_text_dataset(name, _given_dir(data_dir), seed=seed, download=download)
    raise EvonasError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")


def load_cifar10_test(data_dir: str | os.PathLike | None = None, *,
                      download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The official CIFAR-10 test batch, normalised like the training data: (x, y).

    For the final evaluation of chosen layers only; the search never reads it.
    """
    folder = _cifar10_folder(data_dir, download=download)
    images, labels = _read_cached(folder, (CIFAR10_TEST_FILE,))
    return _normalise_cifar10(images), torch.from_numpy(labels)


def clear_cache() -> None:
    """Drop the decoded CIFAR-10 arrays and splits held by this process."""
    _CACHE.clear()
    _SPLITS.clear()


# --- CIFAR-10 ----------------------------------------------------------------------------


def _load_cifar10(data_dir: str | os.PathLike | None, *, val_size: int, seed: int,
                  download: bool) -> Dataset:
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
        raise EvonasError(f"val_size must be a positive integer, got {val_size!r}")
    folder = _cifar10_folder(data_dir, download=download)
    key = (str(folder), val_size, seed)
    if key not in _SPLITS:
        _SPLITS[key] = _split_cifar10(folder, val_size, seed)
    return _SPLITS[key]


def _split_cifar10(folder: Path, val_size: int, seed: int) -> Dataset:
    images, labels = _read_cached(folder, CIFAR10_TRAIN_FILES)
    n = len(labels)
    if val_size >= n:
        raise EvonasError(f"val_size {val_size} leaves no training images: CIFAR-10 in "
                          f"{folder} has {n}; use at most {n - 1}")
    train_idx, val_idx = _split_indices(n, val_size, seed)
    return Dataset(
        train_x=_normalise_cifar10(images[train_idx]),
        train_y=torch.from_numpy(labels[train_idx]),
        val_x=_normalise_cifar10(images[val_idx]),
        val_y=torch.from_numpy(labels[val_idx]),
        num_classes=CIFAR10_NUM_CLASSES,
        name="cifar10",
    )


def _split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Sorted so each split keeps the file order; training samples minibatches at random anyway.
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _normalise_cifar10(images: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    return x.div_(255.0).sub_(mean).div_(std)


def ensure_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                   download: bool = True) -> None:
    """Check (and for CIFAR-10, download if absent and allowed) a dataset without loading
    it: the search calls this before any work starts, so a missing folder fails at once."""
    if name not in DATASETS:
        raise EvonasError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if name == "cifar10":
        folder = _cifar10_folder(data_dir, download=download)
        missing = [f for f in CIFAR10_TRAIN_FILES if not (folder / f).is_file()]
        if missing:
            raise EvonasError(f"CIFAR-10 folder {folder} lacks {missing[0]}; {_FIX_HINT}")
    if name == "shakespeare":
        read_shakespeare(_given_dir(data_dir), download=download)


def _given_dir(data_dir: str | os.PathLike | None) -> str | os.PathLike | None:
    return data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    data_dir = _given_dir(data_dir)
    if data_dir is None:
        raise EvonasError(f"no CIFAR-10 folder given: {_FIX_HINT}")
    return Path(data_dir).expanduser().resolve()


def _cifar10_folder(data_dir: str | os.PathLike | None, *, download: bool) -> Path:
    """The cifar-10-batches-py folder for data_dir, downloading it there if absent."""
    root = _resolve_data_dir(data_dir)
    # DIR may be the batches folder itself: by its name, or by holding any batch file.
    batch_files = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
    if root.is_dir() and (root.name == CIFAR10_FOLDER
                          or any((root / name).is_file() for name in batch_files)):
        return root
    if root.name == CIFAR10_FOLDER:
        root = root.parent
    folder = root / CIFAR10_FOLDER
    if folder.is_dir():
        return folder
    if not download:
        raise EvonasError(f"CIFAR-10 not found: {root} holds no {CIFAR10_FOLDER} folder; "
                          f"{_FIX_HINT}")
    try:
        _download_cifar10(root)
    except (OSError, ValueError, tarfile.TarError) as err:
        raise EvonasError(f"CIFAR-10 not found: {root} holds no {CIFAR10_FOLDER} folder and "
                          f"the download failed ({err}); {_FIX_HINT}") from None
    return folder


def _download_cifar10(root: Path) -> None:
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_cifar10(root)
    except BaseException:
        if created:  # a failed download leaves nothing behind
            shutil.rmtree(root, ignore_errors=True)
        raise


def _fetch_cifar10(root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar10-download-") as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        with urllib.request.urlopen(CIFAR10_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
                open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        digest = _md5(archive)
        if digest != CIFAR10_MD5:
            raise ValueError(f"archive md5 {digest} is not the official {CIFAR10_MD5}")
        # Extract next to the final place, then rename, so an interrupted extraction never
        # leaves a half-written cifar-10-batches-py that later runs would take as complete.
        staging = Path(tmp) / "extract"
        _safe_extract(archive, staging)
        (staging / CIFAR10_FOLDER).rename(root / CIFAR10_FOLDER)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract only regular files and folders under cifar-10-batches-py/, never outside dest."""
    dest.mkdir(parents=True, exist_ok=True)
    base = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            target = (base / member.name).resolve()
            if not target.is_relative_to(base) or not (member.isfile() or member.isdir()):
                raise ValueError(f"unsafe archive member {member.name!r}")
            if Path(member.name).parts[:1] == (CIFAR10_FOLDER,):
                members.append(member)
        # The checks above already refuse links, devices and escaping paths; the "data"
        # filter repeats them where this Python has it (3.10.12+, 3.11.4+).
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(base, members=members, **extra)
    if not (base / CIFAR10_FOLDER).is_dir():
        raise ValueError(f"archive holds no {CIFAR10_FOLDER} folder")


def _read_cached(folder: Path, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    key = (str(folder), ",".join(files))
    if key not in _CACHE:
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise EvonasError(f"CIFAR-10 folder {folder} is incomplete: {missing[0]} is missing; "
                              f"re-extract the official archive there or {_FIX_HINT}")
        parts = [_read_batch(folder / name) for name in files]
        _CACHE[key] = (np.concatenate([p[0] for p in parts]),
                       np.concatenate([p[1] for p in parts]))
    return _CACHE[key]


# Every global a python-format CIFAR-10 batch references: numpy's array reconstruction (under
# numpy.core in the official files, numpy 1.x; under numpy._core when numpy 2 wrote the file)
# and _codecs.encode, through which Python 3 pickles bytes at protocols 0-2. Dicts, lists,
# strings and numbers need no global. Any other global is a callable the file could run.
_BATCH_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class _RefusedGlobal(pickle.UnpicklingError):
    """A batch file names a global outside _BATCH_GLOBALS; the message is its dotted name."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds and refuses any other global before it is loaded."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _BATCH_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch file: uint8 images (N,3,32,32) in CHW order, int64 labels (N,)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except _RefusedGlobal as err:
        raise EvonasError(f"CIFAR-10 batch {path} refers to {err}, which no official batch "
                          f"does, so it was not loaded (it could run code); replace it with "
                          f"the file of the official archive or {_FIX_HINT}") from None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise EvonasError(f"cannot read CIFAR-10 batch {path} ({type(err).__name__}: {err}); "
                          f"re-extract the official archive there or {_FIX_HINT}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise EvonasError(f"CIFAR-10 batch {path} has data of shape {data.shape} and "
                          f"labels of shape {labels.shape}, expected N x 3072 and N labels; "
                          f"re-extract the official archive there or {_FIX_HINT}")
    if len(labels) and (labels.min() < 0 or labels.max() >= CIFAR10_NUM_CLASSES):
        raise EvonasError(f"CIFAR-10 batch {path} has labels outside 0..9; "
                          f"re-extract the official archive there or {_FIX_HINT}")
    return data.reshape(-1, 3, 32, 32), labels


# --- synthetic ---------------------------------------------------------------------------

_SYNTH_CLASSES = 10
_SYNTH_WAVES = 4  # sinusoids per class and channel: low-frequency texture
_SYNTH_MAX_FREQ = 3  # cycles per image, so templates survive 3x3 convs and pooling
_SYNTH_COLOUR = 0.5  # max per-class colour offset
_SYNTH_SHIFT = 4  # max translation in pixels, as the proxy's random crop
_SYNTH_CONTRAST = (0.6, 1.4)  # range of the weight of the image's own class template
# Max weight of a random other class blended in. It can exceed the own class's weight, so
# some images are ambiguous and 100% is out of reach.
_SYNTH_DISTRACTOR = 1.1
# Std of white noise, relative to unit-scale templates. Kept moderate: heavy pixel noise
# dominates per-sample statistics and stalls per-sample normalisers (GroupNorm, EvoNorm-S0
# style) far more than it does BatchNorm.
_SYNTH_NOISE = 0.5


def make_synthetic(n_train: int = 2048, n_val: int = 512, *, seed: int = 0) -> Dataset:
    """A 10-class, 32x32x3 dataset made from numpy Generator(seed).

    Each class has a template: a colour offset plus a few low-frequency sinusoids per channel.
    An image is its class template at random contrast and translation, blended with a random
    other class's template and white noise. A small CNN learns it well above chance in ~50 SGD
    steps without reaching 100% (BN-ReLU proxies: 0.65-0.80 after 60 steps at batch 64); a
    network whose features are constant stays at chance.
    """
    for label, value in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvonasError(f"{label} must be a positive integer, got {value!r}")
    rng = np.random.default_rng(seed)
    templates = _synthetic_templates(rng)
    x, y = _synthetic_images(rng, templates, n_train + n_val)
    # Standardise with training statistics only, as the CIFAR-10 constants are.
    mean = x[:n_train].mean(axis=(0, 2, 3), keepdims=True)
    std = x[:n_train].std(axis=(0, 2, 3), keepdims=True)
    x = (x - mean) / std
    return Dataset(
        train_x=torch.from_numpy(x[:n_train].copy()),
        train_y=torch.from_numpy(y[:n_train].copy()),
        val_x=torch.from_numpy(x[n_train:].copy()),
        val_y=torch.from_numpy(y[n_train:].copy()),
        num_classes=_SYNTH_CLASSES,
        name="synthetic",
    )


def _synthetic_templates(rng: np.random.Generator) -> np.ndarray:
    """(classes, 3, 32, 32) templates: colour offset plus low-frequency sinusoids."""
    grid = np.arange(32, dtype=np.float64) / 32.0
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    shape = (_SYNTH_CLASSES, 3, _SYNTH_WAVES)
    fx = rng.integers(0, _SYNTH_MAX_FREQ + 1, size=shape)
    fy = rng.integers(0, _SYNTH_MAX_FREQ + 1, size=shape)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=shape)
    amp = rng.uniform(0.3, 1.0, size=shape)
    waves = amp[..., None, None] * np.sin(
        2.0 * np.pi * (fx[..., None, None] * xx + fy[..., None, None] * yy)
        + phase[..., None, None])
    colour = rng.uniform(-_SYNTH_COLOUR, _SYNTH_COLOUR, size=(_SYNTH_CLASSES, 3, 1, 1))
    return waves.sum(axis=2) / np.sqrt(_SYNTH_WAVES) + colour


def _synthetic_images(rng: np.random.Generator, templates: np.ndarray,
                      n: int) -> tuple[np.ndarray, np.ndarray]:
    # Balanced labels, so a constant predictor scores exactly chance.
    y = rng.permutation(np.arange(n) % _SYNTH_CLASSES).astype(np.int64)
    other = (y + rng.integers(1, _SYNTH_CLASSES, size=n)) % _SYNTH_CLASSES
    contrast = rng.uniform(*_SYNTH_CONTRAST, size=(n, 1, 1, 1))
    blend = rng.uniform(0.0, _SYNTH_DISTRACTOR, size=(n, 1, 1, 1))
    x = (contrast * templates[y] + blend * templates[other]).astype(np.float32)
    # Circular translation by up to _SYNTH_SHIFT pixels; one np.roll per distinct shift.
    shifts = rng.integers(-_SYNTH_SHIFT, _SYNTH_SHIFT + 1, size=(n, 2))
    for dy, dx in np.unique(shifts, axis=0):
        same = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
        x[same] = np.roll(x[same], (int(dy), int(dx)), axis=(2, 3))
    x += _SYNTH_NOISE * rng.standard_normal(size=x.shape, dtype=np.float32)
    return x, y
