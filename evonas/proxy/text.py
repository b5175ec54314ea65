"""Character-level text for the language-model proxy: tiny Shakespeare and a synthetic chain.

The text half of the proxy data step (data -> models -> train): load_dataset in
evonas/proxy/data.py hands the names in TEXT_DATASETS to load_text_dataset, whose
TextDataset the LM trainer (evonas/proxy/train_lm.py) samples windows from.

- "shakespeare": tiny Shakespeare (karpathy/char-rnn, data/tinyshakespeare/input.txt, MIT),
  read from a folder holding input.txt or tinyshakespeare.txt.gz; where the folder holds
  neither, downloaded into it as input.txt. The text is always checked against the sha256
  of the published file, so every run scores candidates on the same characters.
- "synthetic_text": a first-order Markov chain over 16 symbols made in-process from the seed,
  for smoke runs and tests: each symbol has a few likely successors, so a tiny model drops
  from log2(16) = 4 bits per character towards the chain's entropy rate (about 1.2 bits)
  in a few dozen steps, offline.

The vocabulary is the set of characters of the training split; the validation split is the
last 10% of the text, so validation characters follow the training ones as in a corpus
read front to back (no window straddles the two). Windows for training are drawn with the
caller's torch.Generator; validation windows are fixed, so every candidate is scored on
the same characters.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from evonas.errors import EvonasError

TEXT_DATASETS = ("shakespeare", "synthetic_text")
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                   "data/tinyshakespeare/input.txt")
# Of the text (input.txt, 1,115,394 bytes), not of any compressed copy.
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILES = ("input.txt", "tinyshakespeare.txt.gz")
VAL_FRACTION = 0.1

_DOWNLOAD_TIMEOUT_S = 60.0
_FIX_HINT = ("pass --data-dir DIR or set EVONAS_DATA_DIR to a folder holding input.txt of "
             "karpathy/char-rnn's data/tinyshakespeare (or tinyshakespeare.txt.gz)")


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """Token ids (int64, 1-D) of the training and validation text, and the vocabulary.

    vocab[i] is the character of id i. num_classes is the vocabulary size, the number of
    classes the LM's head predicts, under the name the architecture registry passes on.
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab: str
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.vocab)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())

    def __repr__(self) -> str:
        return (f"TextDataset(name={self.name!r}, train={len(self.train)}, "
                f"val={len(self.val)}, vocab={len(self.vocab)})")


def load_text_dataset(name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                      download: bool = True) -> TextDataset:
    """Load a text dataset by name; seed makes the synthetic chain, data_dir holds the text."""
    if name == "shakespeare":
        return split_text(read_shakespeare(data_dir, download=download), name)
    if name == "synthetic_text":
        return make_markov_text(seed=seed)
    raise EvonasError(f"unknown text dataset {name!r}: use one of {', '.join(TEXT_DATASETS)}")


def split_text(text: str, name: str) -> TextDataset:
    """Ids of the first 90% (training) and last 10% (validation) over the training vocab."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n_train = len(codes) - int(len(codes) * VAL_FRACTION)
    symbols = np.unique(codes[:n_train])
    unseen = np.setdiff1d(codes[n_train:], symbols)
    if len(unseen):  # the checksummed corpus has none; another text might
        raise EvonasError(f"{name}: the validation split holds characters the training split "
                          f"lacks ({''.join(map(chr, unseen[:5]))!r}); use a longer text")
    ids = torch.from_numpy(np.searchsorted(symbols, codes).astype(np.int64))
    return TextDataset(train=ids[:n_train], val=ids[n_train:],
                       vocab="".join(map(chr, symbols)), name=name)


# --- windows -----------------------------------------------------------------------------


def sample_windows(ids: torch.Tensor, batch_size: int, context: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (batch_size, context): windows at offsets drawn from gen, and the
    same windows shifted by one character (the next-character targets)."""
    starts = torch.randint(0, len(ids) - context, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = ids[idx]
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(ids: torch.Tensor, context: int,
                 max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first max_windows (all when None) consecutive, non-overlapping (x, y) windows."""
    n = (len(ids) - 1) // context
    n = n if max_windows is None else min(n, max_windows)
    x = ids[: n * context].view(n, context)
    y = ids[1: n * context + 1].view(n, context)
    return x, y


def check_windows(data: TextDataset, context: int) -> None:
    """Refuse a context longer than either split leaves room for."""
    shortest = min(len(data.train), len(data.val))
    if context >= shortest:
        raise EvonasError(f"context {context} needs splits longer than that; {data.name} has "
                          f"{shortest} characters in its shorter split: lower the context")


# --- tiny Shakespeare --------------------------------------------------------------------


def read_shakespeare(data_dir: str | os.PathLike | None, *, download: bool = True) -> str:
    """The checksummed text from data_dir, downloading input.txt there when it holds neither
    input.txt nor tinyshakespeare.txt.gz and download is allowed."""
    if data_dir is None:
        raise EvonasError(f"no tiny Shakespeare folder given: {_FIX_HINT}")
    folder = Path(data_dir).expanduser().resolve()
    found = [folder / f for f in SHAKESPEARE_FILES if (folder / f).is_file()]
    if found:
        return _checked_text(_read_bytes(found[0]), found[0])
    if not download:
        raise EvonasError(f"tiny Shakespeare not found: {folder} holds none of "
                          f"{', '.join(SHAKESPEARE_FILES)}; {_FIX_HINT}")
    try:
        return _checked_text(_download(folder), folder / SHAKESPEARE_FILES[0])
    except (OSError, ValueError) as err:
        raise EvonasError(f"tiny Shakespeare not found: {folder} holds none of "
                          f"{', '.join(SHAKESPEARE_FILES)} and the download failed ({err}); "
                          f"{_FIX_HINT}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise EvonasError(f"cannot read {path} ({type(err).__name__}: {err}); delete it and "
                          f"copy a fresh one there, or {_FIX_HINT}") from None


def _checked_text(raw: bytes, path: Path) -> str:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise EvonasError(f"{path} is not tiny Shakespeare (sha256 {digest[:12]}..., expected "
                          f"{SHAKESPEARE_SHA256[:12]}...): delete it and copy a fresh one "
                          f"there, or {_FIX_HINT}")
    return raw.decode("utf-8")


def _download(folder: Path) -> bytes:
    """Fetch input.txt into folder; written only once its checksum matches."""
    with urllib.request.urlopen(SHAKESPEARE_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        raw = response.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"downloaded text has sha256 {digest[:12]}..., not the published one")
    folder.mkdir(parents=True, exist_ok=True)
    # Renamed into place, so an interrupted write never leaves a truncated input.txt.
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".input-", delete=False) as tmp:
        tmp.write(raw)
    Path(tmp.name).replace(folder / SHAKESPEARE_FILES[0])
    return raw


# --- synthetic Markov chain --------------------------------------------------------------

_MARKOV_SYMBOLS = "abcdefghijklmnop"
_MARKOV_SUCCESSORS = 3  # next symbols per symbol: about 1.2 bits of entropy per character


def make_markov_text(n_train: int = 20_000, n_val: int = 4_000, *, seed: int = 0) -> TextDataset:
    """A first-order Markov chain over 16 symbols, made from numpy Generator(seed).

    Each symbol moves to one of 3 successors with Dirichlet(1) weights, so the chain's
    entropy rate is well below log2(16) = 4 bits: a model that learns the transitions
    scores clearly better than one that only learns symbol frequencies.
    """
    for label, value in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise EvonasError(f"{label} must be an integer >= 2, got {value!r}")
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(_markov_transitions(rng), axis=1)
    draws = rng.random(n_train + n_val)
    ids = np.empty(n_train + n_val, dtype=np.int64)
    state = int(rng.integers(len(_MARKOV_SYMBOLS)))
    for i, u in enumerate(draws):
        state = min(int(np.searchsorted(cumulative[state], u, side="right")),
                    len(_MARKOV_SYMBOLS) - 1)
        ids[i] = state
    ids_t = torch.from_numpy(ids)
    return TextDataset(train=ids_t[:n_train], val=ids_t[n_train:], vocab=_MARKOV_SYMBOLS,
                       name="synthetic_text")


def _markov_transitions(rng: np.random.Generator) -> np.ndarray:
    """(16, 16) row-stochastic matrix with _MARKOV_SUCCESSORS non-zero entries per row."""
    n = len(_MARKOV_SYMBOLS)
    matrix = np.zeros((n, n))
    for row in matrix:
        row[rng.choice(n, _MARKOV_SUCCESSORS, replace=False)] = rng.dirichlet(
            np.ones(_MARKOV_SUCCESSORS))
    return matrix
