"""Proxy datasets: the CIFAR-10 reader on a tiny fake in the official layout, and synthetic data.

No test touches the network: downloads are exercised with a patched urlopen.
"""

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from evonas.errors import EvonasError
from evonas.proxy import data as proxy_data
from evonas.proxy.data import (CIFAR10_MEAN, CIFAR10_STD, load_cifar10_test, load_dataset,
                               make_synthetic)


PER_BATCH = 60  # 5 x 60 = 300 training images
N_TEST = 40


def _batch(rng: np.random.Generator, n: int, label: str) -> dict:
    return {"batch_label": label, "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, size=n)],
            "filenames": [f"img_{i}.png" for i in range(n)]}


def write_fake_cifar(root: Path, seed: int = 0) -> dict[str, dict]:
    """Random images pickled in the official cifar-10-batches-py layout; returns the batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": _batch(rng, PER_BATCH, f"training batch {i} of 5")
               for i in range(1, 6)}
    batches["test_batch"] = _batch(rng, N_TEST, "testing batch 1 of 1")
    for name, batch in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return batches


def _raw_rows(x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: back to uint8 rows of 3072 values in CHW order."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return torch.round((x * std + mean) * 255).to(torch.uint8).reshape(len(x), -1).numpy()


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("EVONAS_DATA_DIR", raising=False)
    proxy_data.clear_cache()
    yield
    proxy_data.clear_cache()


# --- CIFAR-10 reader ---------------------------------------------------------------------


def test_cifar10_reads_official_layout_and_splits_train_batches(tmp_path):
    batches = write_fake_cifar(tmp_path)
    ds = load_dataset("cifar10", tmp_path, val_size=50, seed=3)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_x.shape == (250, 3, 32, 32) and ds.val_x.shape == (50, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    # Train and validation together are exactly the five training batches, image with label.
    expected = {bytes(row): label for i in range(1, 6)
                for row, label in zip(batches[f"data_batch_{i}"]["data"],
                                      batches[f"data_batch_{i}"]["labels"])}
    got = {}
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y)):
        got.update({bytes(row): int(label) for row, label in zip(_raw_rows(x), y)})
    assert got == expected
    test_rows = {bytes(row) for row in batches["test_batch"]["data"]}
    assert not test_rows & set(got), "the official test batch must not leak into the search"


def test_cifar10_pixels_are_chw_and_normalised_per_channel(tmp_path):
    batches = write_fake_cifar(tmp_path)
    red = np.zeros((3, 32, 32), dtype=np.uint8)
    red[0] = 255  # channel-major rows: the first 1024 values are the red plane
    batches["data_batch_1"]["data"][:] = red.reshape(-1)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump(batches["data_batch_1"], f, protocol=2)
    ds = load_dataset("cifar10", tmp_path, val_size=1, seed=0)
    image = ds.train_x[0]  # the split keeps file order, so this is from data_batch_1
    for c in range(3):
        value = ((255 if c == 0 else 0) / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        torch.testing.assert_close(image[c], torch.full((32, 32), value))


def test_cifar10_split_depends_on_seed_only(tmp_path):
    write_fake_cifar(tmp_path)
    a = load_dataset("cifar10", tmp_path, val_size=30, seed=1)
    proxy_data.clear_cache()
    b = load_dataset("cifar10", tmp_path, val_size=30, seed=1)
    c = load_dataset("cifar10", tmp_path, val_size=30, seed=2)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.val_x, c.val_x)


def test_cifar10_accepts_parent_batches_folder_and_env_var(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path)
    via_parent = load_dataset("cifar10", tmp_path, val_size=10)
    proxy_data.clear_cache()
    via_folder = load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"), val_size=10)
    proxy_data.clear_cache()
    monkeypatch.setenv("EVONAS_DATA_DIR", str(tmp_path))
    via_env = load_dataset("cifar10", val_size=10)
    for other in (via_folder, via_env):
        assert torch.equal(via_parent.train_x, other.train_x)
        assert torch.equal(via_parent.val_y, other.val_y)


def test_cifar10_is_cached_per_folder(tmp_path):
    write_fake_cifar(tmp_path)
    first = load_dataset("cifar10", tmp_path, val_size=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").unlink()
    # Served from memory: the search reloads the dataset for every candidate.
    assert load_dataset("cifar10", tmp_path, val_size=10) is first
    assert len(load_dataset("cifar10", tmp_path, val_size=20).val_y) == 20


def test_cifar10_test_batch_for_final_evaluation(tmp_path):
    batches = write_fake_cifar(tmp_path)
    x, y = load_cifar10_test(tmp_path)
    assert x.shape == (N_TEST, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == batches["test_batch"]["labels"]
    np.testing.assert_array_equal(_raw_rows(x), batches["test_batch"]["data"])


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(EvonasError, match="--data-dir.*EVONAS_DATA_DIR"):
        load_dataset("cifar10", tmp_path / "nowhere", download=False)


def test_no_folder_given_names_the_fix():
    with pytest.raises(EvonasError, match="--data-dir.*EVONAS_DATA_DIR"):
        load_dataset("cifar10", download=False)


def test_missing_batch_file_is_named(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(EvonasError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_corrupt_batch_file_is_named(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(EvonasError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)


class _RunsOnLoad:
    """Pickles as a call of fn(arg): what a planted batch file does when it is unpickled."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("call", ["os.system", "builtins.exec"])
def test_batch_that_would_run_code_is_refused_unrun(tmp_path, call):
    batches = write_fake_cifar(tmp_path)
    marker = tmp_path / "ran"
    payload = (_RunsOnLoad(os.system, f"touch {marker}") if call == "os.system"
               else _RunsOnLoad(exec, f"open({str(marker)!r}, 'w').close()"))
    planted = dict(batches["data_batch_4"], labels=payload)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        pickle.dump(planted, f, protocol=2)
    with pytest.raises(EvonasError, match=r"data_batch_4 refers to .*(system|exec).*official "
                                          r"archive") as err:
        load_dataset("cifar10", tmp_path)
    assert "\n" not in str(err.value)
    assert not marker.exists(), "the planted pickle ran"


def _python2_style(batch: dict) -> bytes:
    """batch pickled as the official files are: protocol 2, numpy 1.x's global names, the
    pixels as a latin1 string (Python 2's str) rather than bytes."""
    func, args, (version, shape, dtype, fortran, raw) = batch["data"].__reduce__()

    class Data:
        def __reduce__(self):
            return func, args, (version, shape, dtype, fortran, raw.decode("latin1"))

    blob = pickle.dumps(dict(batch, data=Data()), protocol=2)
    return blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.mark.parametrize("protocol", ["python2", 4])
def test_batches_of_other_writers_load(tmp_path, protocol):
    batches = write_fake_cifar(tmp_path)
    raw = batches["test_batch"]
    blob = (_python2_style(raw) if protocol == "python2"
            else pickle.dumps(raw, protocol=protocol))
    assert (b"numpy.core.multiarray" in blob) == (protocol == "python2")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    x, y = load_cifar10_test(tmp_path)
    assert y.tolist() == raw["labels"]
    np.testing.assert_array_equal(_raw_rows(x), raw["data"])


def test_bad_val_size_and_seed_are_rejected(tmp_path):
    write_fake_cifar(tmp_path)
    for val_size in (0, 300, 2.5):
        with pytest.raises(EvonasError, match="val_size"):
            load_dataset("cifar10", tmp_path, val_size=val_size)
    with pytest.raises(EvonasError, match="seed"):
        load_dataset("cifar10", tmp_path, seed=-1)
    with pytest.raises(EvonasError, match="synthetic"):
        load_dataset("cifar10", tmp_path, n_train=100)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(EvonasError, match="cifar10, synthetic"):
        load_dataset("imagenet")


# --- download (offline: urlopen is patched) -----------------------------------------------


def _archive_bytes(tmp_path: Path, extra: tarfile.TarInfo | None = None) -> bytes:
    src = tmp_path / "src"
    write_fake_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size))
    return buf.getvalue()


def _serve(monkeypatch, payload: bytes) -> None:
    monkeypatch.setattr(proxy_data.urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(payload))


def test_download_failure_says_folder_missing_and_how_to_fix(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(proxy_data.urllib.request, "urlopen", offline)
    with pytest.raises(EvonasError, match="download failed.*--data-dir.*EVONAS_DATA_DIR"):
        load_dataset("cifar10", tmp_path / "data")
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_download_rejects_wrong_md5(tmp_path, monkeypatch):
    _serve(monkeypatch, _archive_bytes(tmp_path))
    with pytest.raises(EvonasError, match="md5"):
        load_dataset("cifar10", tmp_path / "data")
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_download_extracts_into_data_dir(tmp_path, monkeypatch):
    payload = _archive_bytes(tmp_path)
    _serve(monkeypatch, payload)
    monkeypatch.setattr(proxy_data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    ds = load_dataset("cifar10", tmp_path / "data", val_size=10)
    assert len(ds.train_y) + len(ds.val_y) == 5 * PER_BATCH
    leftovers = [p.name for p in (tmp_path / "data").iterdir()]
    assert leftovers == ["cifar-10-batches-py"]


def test_download_refuses_path_traversal(tmp_path, monkeypatch):
    evil = tarfile.TarInfo("cifar-10-batches-py/../../evil.txt")
    evil.size = 4
    payload = _archive_bytes(tmp_path, extra=evil)
    _serve(monkeypatch, payload)
    monkeypatch.setattr(proxy_data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    with pytest.raises(EvonasError, match="unsafe archive member"):
        load_dataset("cifar10", tmp_path / "data")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


# --- synthetic -----------------------------------------------------------------------------


def test_synthetic_shapes_and_normalisation():
    ds = load_dataset("synthetic")
    assert ds.name == "synthetic" and ds.num_classes == 10
    assert ds.train_x.shape == (2048, 3, 32, 32) and ds.val_x.shape == (512, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and ds.val_y.dtype == torch.int64
    torch.testing.assert_close(ds.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3,
                               rtol=0)
    torch.testing.assert_close(ds.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    counts = torch.bincount(ds.train_y, minlength=10)
    assert counts.min() > 150 and counts.max() < 260  # roughly balanced


def test_synthetic_is_a_function_of_seed():
    a, b, c = make_synthetic(64, 16, seed=5), make_synthetic(64, 16, seed=5), \
        make_synthetic(64, 16, seed=6)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.train_x, c.train_x)
    sized = load_dataset("synthetic", n_train=100, n_val=20, seed=5)
    assert len(sized.train_y) == 100 and len(sized.val_y) == 20


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(EvonasError, match="n_train"):
        make_synthetic(0, 10)
    with pytest.raises(EvonasError, match="n_val"):
        load_dataset("synthetic", n_val=-1)
