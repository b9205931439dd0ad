"""Tests for jaxkd.data.datasets: the IDX tfds builders, loading, and every error they promise."""

import gzip
import os
import re
import shutil
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from jaxkd.data import datasets

REAL_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
NUM_TRAIN, NUM_TEST = 300, 100


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, data."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_gz(path, payload: bytes) -> None:
  with gzip.open(path, "wb") as f:
    f.write(payload)


def make_split(num: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
  """Images whose first two pixels spell the example number, and labels cycling through 10 classes."""
  ids = np.arange(num) + offset
  images = np.random.default_rng(offset).integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
  images[:, 0, 0] = ids % 256
  images[:, 0, 1] = ids // 256
  labels = ((ids * 7) % 10).astype(np.uint8)
  return images, labels


def write_idx_dir(directory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  os.makedirs(directory, exist_ok=True)
  splits = {"train": make_split(NUM_TRAIN, 0), "test": make_split(NUM_TEST, 1000)}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    images, labels = splits[split]
    write_gz(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), idx_bytes(images))
    write_gz(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), idx_bytes(labels))
  return splits


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Small IDX files, and a data_dir where jaxkd_mnist was prepared from them once."""
  source = tmp_path_factory.mktemp("idx")
  splits = write_idx_dir(source)
  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.builder("mnist", data_dir=data_dir, source_dir=source, download=False)
  return source, data_dir, splits


# --- read_idx ----------------------------------------------------------------------------


def test_read_idx_round_trip(tmp_path):
  array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
  path = tmp_path / "x-images-idx3-ubyte.gz"
  write_gz(path, idx_bytes(array))
  np.testing.assert_array_equal(datasets.read_idx(path, ndim=3), array)


BAD_CONTENTS = [
  ("wrong_magic", idx_bytes(np.zeros(4, np.uint8)), 3, "wrong magic number 0x00000801, expected 0x00000803"),
  ("float_type", bytes([0, 0, 0x0D, 1]) + (4).to_bytes(4, "big") + bytes(16), 1, "wrong magic number 0x00000d01"),
  ("short_data", idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10], 3, "size mismatch"),
  (
    "long_data",
    idx_bytes(np.zeros(7, np.uint8)) + b"\0",
    1,
    "declares shape (7,) = 7 bytes of data but the file holds 8",
  ),
  ("short_header", idx_bytes(np.zeros((3, 28, 28), np.uint8))[:9], 3, "truncated header"),
  ("empty", b"", 1, "too short for an IDX header"),
]


@pytest.mark.parametrize("name, payload, ndim, message", BAD_CONTENTS, ids=[case[0] for case in BAD_CONTENTS])
def test_read_idx_rejects_bad_contents(tmp_path, name, payload, ndim, message):
  path = tmp_path / f"{name}-idx-ubyte.gz"
  write_gz(path, payload)
  with pytest.raises(datasets.IdxFormatError, match=re.escape(message)) as info:
    datasets.read_idx(path, ndim=ndim)
  assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  write_gz(path, idx_bytes(np.arange(200, dtype=np.uint8) % 10))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(datasets.IdxFormatError, match="not a complete gzip file") as info:
    datasets.read_idx(path, ndim=1)
  assert str(path) in str(info.value)


def test_read_idx_rejects_uncompressed_file(tmp_path):
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(idx_bytes(np.arange(10, dtype=np.uint8)))
  with pytest.raises(datasets.IdxFormatError, match=re.escape(f"{path}: not a complete gzip file")):
    datasets.read_idx(path, ndim=1)


# --- building and loading ------------------------------------------------------------------


def test_builders_are_registered_without_clashing():
  assert datasets.JaxkdFashionMnist.name == "jaxkd_fashion_mnist"
  assert datasets.JaxkdMnist.name == "jaxkd_mnist"
  assert tfds.builder_cls("jaxkd_mnist") is datasets.JaxkdMnist


@pytest.mark.parametrize("split, num", [("train", NUM_TRAIN), ("test", NUM_TEST)])
def test_load_returns_the_idx_examples_in_order(prepared, split, num):
  _, data_dir, splits = prepared
  ds = datasets.load("mnist", split, data_dir=data_dir, download=False)
  images, labels = splits[split]
  assert len(ds) == num
  assert ds.images.shape == (num, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (num,) and ds.labels.dtype == np.int32
  assert (ds.num_classes, ds.name, ds.split) == (10, "mnist", split)
  np.testing.assert_array_equal(ds.images[..., 0], images)
  np.testing.assert_array_equal(ds.labels, labels)
  np.testing.assert_array_equal(ds.indices, np.arange(num))


def test_load_data_source_is_random_access_array_record(prepared):
  _, data_dir, splits = prepared
  source = datasets.load_data_source("mnist", "train[10:20]", data_dir=data_dir, download=False)
  assert len(source) == 10
  example = source[3]
  np.testing.assert_array_equal(example["image"][..., 0], splits["train"][0][13])
  assert example["label"] == splits["train"][1][13]
  assert source.dataset_info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert source.dataset_info.features["label"].names[:2] == ["0", "1"]


def test_prepared_data_is_reused_without_the_source_files(prepared, tmp_path):
  source, data_dir, splits = prepared
  private_source = tmp_path / "idx"
  shutil.copytree(source, private_source)
  private_data = tmp_path / "tfds"
  datasets.load("mnist", "test", data_dir=private_data, source_dir=private_source, download=False)
  shutil.rmtree(private_source)
  # No files anywhere and no download: only the prepared copy can answer.
  ds = datasets.load("mnist", "test", data_dir=private_data, source_dir=private_source, download=False)
  np.testing.assert_array_equal(ds.labels, splits["test"][1])
  assert (private_data / "jaxkd_mnist" / "1.0.0").is_dir()


def test_source_dir_is_searched_before_the_system_directory(tmp_path):
  # Fashion-MNIST's system directory may exist (and hold 60000 examples); the caller's files win.
  write_idx_dir(tmp_path / "idx")
  ds = datasets.load("fashion_mnist", "test", data_dir=tmp_path / "tfds", source_dir=tmp_path / "idx", download=False)
  assert len(ds) == NUM_TEST and ds.name == "fashion_mnist"
  assert (tmp_path / "tfds" / "jaxkd_fashion_mnist" / "1.0.0").is_dir()


def test_missing_files_name_every_directory_searched(tmp_path, monkeypatch):
  partial = tmp_path / "partial"
  write_idx_dir(partial)
  os.remove(partial / "t10k-labels-idx1-ubyte.gz")
  system = tmp_path / "not-installed"
  monkeypatch.setattr(datasets, "SYSTEM_DIRS", {"fashion_mnist": (str(system),), "mnist": ()})
  with pytest.raises(datasets.DataNotFoundError) as info:
    datasets.load("fashion_mnist", "train", data_dir=tmp_path / "tfds", source_dir=partial, download=False)
  message = str(info.value)
  assert f"{partial} (missing t10k-labels-idx1-ubyte.gz)" in message
  assert f"{system} (no such directory)" in message
  assert "Download disabled" in message
  assert not (tmp_path / "tfds" / "jaxkd_fashion_mnist" / "1.0.0").exists()


def test_offline_download_fails_fast_and_clearly(tmp_path, monkeypatch):
  def no_dns(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", no_dns)
  for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(datasets.DataNotFoundError) as info:
    datasets.load("mnist", "train", data_dir=tmp_path / "tfds", source_dir=tmp_path / "empty")
  message = str(info.value)
  assert f"{tmp_path / 'empty'} (no such directory)" in message
  assert "Cannot download from https://storage.googleapis.com/cvdf-datasets/mnist/" in message
  assert "does not resolve" in message


def test_failed_download_through_tfds_is_reported(tmp_path, monkeypatch):
  requested = []

  def failing_download(self, urls):
    requested.extend(urls.values())
    raise ConnectionError("network unreachable")

  monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
  monkeypatch.setattr(tfds.download.DownloadManager, "download", failing_download)
  with pytest.raises(datasets.DataNotFoundError, match=r"failed \(ConnectionError: network unreachable\)") as info:
    with pytest.warns(UserWarning, match=f"source_dir {tmp_path} \\(missing .*files downloaded from https://"):
      datasets.load("mnist", "test", data_dir=tmp_path / "tfds", source_dir=tmp_path)
  assert f"{tmp_path} (missing train-images-idx3-ubyte.gz" in str(info.value)
  assert sorted(os.path.basename(url) for url in requested) == sorted(datasets.IDX_FILES.values())
  assert not (tmp_path / "tfds" / "jaxkd_mnist" / "1.0.0").exists()


@pytest.mark.parametrize(
  "filename, corrupt, message",
  [
    ("t10k-labels-idx1-ubyte.gz", lambda data: data[: len(data) // 2], "not a complete gzip file"),
    ("train-images-idx3-ubyte.gz", lambda data: gzip.compress(gzip.decompress(data)[:-784]), "size mismatch"),
    ("train-labels-idx1-ubyte.gz", lambda data: gzip.compress(b"\0\0\x08\x03" + gzip.decompress(data)[4:]), "magic"),
  ],
  ids=["truncated_gzip", "size_mismatch", "wrong_magic"],
)
def test_corrupt_file_fails_the_build_and_leaves_nothing(tmp_path, filename, corrupt, message):
  source = tmp_path / "idx"
  write_idx_dir(source)
  path = source / filename
  path.write_bytes(corrupt(path.read_bytes()))
  with pytest.raises(datasets.IdxFormatError, match=message) as info:
    datasets.load("mnist", "train", data_dir=tmp_path / "tfds", source_dir=source, download=False)
  assert str(path) in str(info.value)
  # tfds builds in an incomplete.* directory and renames it only on success.
  assert list((tmp_path / "tfds").glob("jaxkd_mnist/*")) == []


def test_image_and_label_counts_must_agree(tmp_path):
  source = tmp_path / "idx"
  write_idx_dir(source)
  write_gz(source / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(NUM_TEST - 1, np.uint8)))
  with pytest.raises(datasets.IdxFormatError, match=f"holds {NUM_TEST} images but .* holds {NUM_TEST - 1} labels"):
    datasets.load("mnist", "test", data_dir=tmp_path / "tfds", source_dir=source, download=False)


def test_labels_must_be_classes(tmp_path):
  source = tmp_path / "idx"
  write_idx_dir(source)
  write_gz(source / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.full(NUM_TEST, 10, np.uint8)))
  with pytest.raises(datasets.IdxFormatError, match=r"t10k-labels-idx1-ubyte.gz: label 10 out of range \[0, 10\)"):
    datasets.load("mnist", "test", data_dir=tmp_path / "tfds", source_dir=source, download=False)


def test_images_must_be_28_by_28(tmp_path):
  source = tmp_path / "idx"
  write_idx_dir(source)
  write_gz(source / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((NUM_TRAIN, 32, 32), np.uint8)))
  with pytest.raises(datasets.IdxFormatError, match="train-images-idx3-ubyte.gz: images are 32x32, expected 28x28"):
    datasets.load("mnist", "train", data_dir=tmp_path / "tfds", source_dir=source, download=False)


def test_a_missing_source_dir_is_named_when_another_directory_is_used(tmp_path, monkeypatch):
  system = tmp_path / "system"
  write_idx_dir(system)
  monkeypatch.setattr(datasets, "SYSTEM_DIRS", {"fashion_mnist": (), "mnist": (str(system),)})
  missing = tmp_path / "typo"
  with pytest.warns(UserWarning) as warned:
    ds = datasets.load("mnist", "test", data_dir=tmp_path / "tfds", source_dir=missing, download=False)
  assert len(ds) == NUM_TEST
  (message,) = [str(w.message) for w in warned if "source_dir" in str(w.message)]
  assert f"source_dir {missing} (no such directory): preparing 'mnist' from {system} instead" in message
  assert f"delete {tmp_path / 'tfds' / 'jaxkd_mnist' / '1.0.0'}" in message


def test_a_source_dir_that_has_the_files_is_used_without_a_warning(tmp_path, recwarn):
  write_idx_dir(tmp_path / "idx")
  datasets.load("mnist", "test", data_dir=tmp_path / "tfds", source_dir=tmp_path / "idx", download=False)
  assert not [w for w in recwarn if "source_dir" in str(w.message)]


def test_an_empty_split_is_a_clear_error(prepared):
  _, data_dir, _ = prepared
  with pytest.raises(ValueError, match=rf"split 'train\[{NUM_TRAIN}:\]' of 'mnist' is empty \(the dataset has train "):
    datasets.load("mnist", f"train[{NUM_TRAIN}:]", data_dir=data_dir, download=False)


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated", "deleted"])
def test_a_damaged_prepared_copy_names_the_directory_to_delete(prepared, tmp_path, damage):
  source, data_dir, splits = prepared
  shutil.copytree(data_dir, tmp_path / "tfds")
  version_dir = tmp_path / "tfds" / "jaxkd_mnist" / "1.0.0"
  (records,) = version_dir.glob("jaxkd_mnist-train.array_record-*")
  raw = bytearray(records.read_bytes())
  if damage == "flipped_bytes":
    raw[200:-200] = bytes(b ^ 0xFF for b in raw[200:-200])
    records.write_bytes(bytes(raw))
  elif damage == "truncated":
    records.write_bytes(bytes(raw[:1000]))
  else:
    records.unlink()
  with pytest.raises(datasets.DamagedDataError) as info:
    datasets.load("mnist", "train", data_dir=tmp_path / "tfds", download=False)
  assert f"the prepared copy of 'mnist' in {version_dir} cannot be read" in str(info.value)
  assert f"Delete {version_dir} and load again" in str(info.value)
  # The advice works: deleted, the copy is prepared again from the IDX files.
  shutil.rmtree(version_dir)
  ds = datasets.load("mnist", "train", data_dir=tmp_path / "tfds", source_dir=source, download=False)
  np.testing.assert_array_equal(ds.labels, splits["train"][1])


def test_unknown_idx_name_is_rejected():
  with pytest.raises(ValueError, match="'emnist' is not an IDX dataset"):
    datasets.builder("emnist")


# --- other tfds datasets -------------------------------------------------------------------


class JaxkdTestCatalogDataset(tfds.core.GeneratorBasedBuilder):
  """Stands in for a catalog dataset (cifar10, ...) prepared elsewhere in array_record format."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # tensorflow/datasets#11212, as in jaxkd.data.datasets.
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=4),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 4}


def test_other_prepared_tfds_datasets_load_by_name(tmp_path):
  JaxkdTestCatalogDataset(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  ds = datasets.load("jaxkd_test_catalog_dataset", "train", data_dir=tmp_path)
  assert ds.images.shape == (12, 8, 8, 3) and ds.num_classes == 4
  np.testing.assert_array_equal(ds.labels, np.arange(12) % 4)
  np.testing.assert_array_equal(ds.images[:, 0, 0, 0], np.arange(12))


def test_unprepared_tfds_dataset_says_where_it_looked(tmp_path):
  with pytest.raises(datasets.DataNotFoundError, match="'jaxkd_test_catalog_dataset' is not prepared in") as info:
    datasets.load("jaxkd_test_catalog_dataset", "train", data_dir=tmp_path)
  assert str(tmp_path) in str(info.value) and "--file_format=array_record" in str(info.value)


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(datasets.DataNotFoundError, match="no_such_dataset_jaxkd not found") as info:
    datasets.load("no_such_dataset_jaxkd", "train", data_dir=tmp_path)
  assert len(str(info.value).splitlines()) == 1  # Not tfds's list of every dataset.


# --- the real thing ------------------------------------------------------------------------


@pytest.mark.skipif(
  not all(os.path.isfile(os.path.join(REAL_FASHION_MNIST, f)) for f in datasets.IDX_FILES.values()),
  reason=f"Fashion-MNIST IDX files are not installed at {REAL_FASHION_MNIST} (Debian package dataset-fashion-mnist).",
)
def test_real_fashion_mnist_from_the_system_directory(tmp_path):
  train = datasets.load("fashion_mnist", "train", data_dir=tmp_path, download=False)
  test = datasets.load("fashion_mnist", "test", data_dir=tmp_path, download=False)
  assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
  assert train.num_classes == test.num_classes == 10
  # Fashion-MNIST is exactly balanced.
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1000))
  # The published normalisation constants are those of this training set.
  (mean,), (std,) = datasets.NORMALIZATION["fashion_mnist"]
  assert abs(train.images.mean() / 255 - mean) < 1e-3 and abs(train.images.std() / 255 - std) < 1e-3
  # Record order is file order.
  labels_file = os.path.join(REAL_FASHION_MNIST, "t10k-labels-idx1-ubyte.gz")
  np.testing.assert_array_equal(test.labels, datasets.read_idx(labels_file, ndim=1))
