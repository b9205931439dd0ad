"""Datasets: tfds builders for MNIST-format (IDX) files, and whole splits as in-memory arrays.

Fashion-MNIST and MNIST are built by jaxkd's own tfds builders, registered as
``jaxkd_fashion_mnist`` and ``jaxkd_mnist`` so that they never clash with the tfds
catalog's ``fashion_mnist``/``mnist`` (whose builders decode PNGs and so need
TensorFlow). Ours read the four standard IDX files offline, in this order:

1. ``source_dir``, when the caller gives one;
2. the system directories in :data:`SYSTEM_DIRS` (Debian's ``dataset-fashion-mnist``
   installs ``/usr/share/datasets/fashion-mnist``);
3. only then the canonical URLs, through tfds's download manager.

A ``source_dir`` that is missing or lacks a file is not fatal while another place has
the data, but it is said: a warning names it and the directory used instead.

The split is prepared once, as ``array_record`` files under ``data_dir``
(tfds's default ``~/tensorflow_datasets``, or ``$TFDS_DATA_DIR``), and every later
call reuses it without looking at the IDX files again. Features are
``tfds.features.Tensor`` (and its subclass ``ClassLabel``), which tfds encodes and
decodes with NumPy alone: nothing here imports TensorFlow.

Any other tfds catalog dataset (``cifar10``, ...) that has already been prepared in
``array_record`` format is read by name as a tfds data source (what ``tfds.data_source``
does, minus the attempt to prepare, which for catalog builders needs TensorFlow).

Every IDX file is read and checked completely (gzip stream, magic number, shape,
byte count, label range) before a single example is written, and tfds writes into
an ``incomplete.*`` directory that it renames only on success: a broken file
raises :class:`IdxFormatError` naming it and leaves no partial dataset behind. A
prepared copy damaged later (a bad disk, an interrupted copy) raises
:class:`DamagedDataError` naming the directory to delete.
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import os
import socket
import urllib.parse
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = [
  "ArrayDataset",
  "DamagedDataError",
  "DataNotFoundError",
  "IDX_FILES",
  "IdxFormatError",
  "NORMALIZATION",
  "SYSTEM_DIRS",
  "JaxkdFashionMnist",
  "JaxkdMnist",
  "builder",
  "find_idx_dir",
  "load",
  "load_data_source",
  "read_idx",
]

# The four files of an MNIST-format dataset, by role.
IDX_FILES: Mapping[str, str] = {
  "train_images": "train-images-idx3-ubyte.gz",
  "train_labels": "train-labels-idx1-ubyte.gz",
  "test_images": "t10k-images-idx3-ubyte.gz",
  "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Directories searched after the caller's ``source_dir``, per dataset.
SYSTEM_DIRS: Mapping[str, tuple[str, ...]] = {
  "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
  "mnist": (),
}

# Canonical download locations (the same mirrors the tfds catalog builders use).
_URLS: Mapping[str, str] = {
  "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
  "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
}

# Per-channel mean and standard deviation of the training images scaled to [0, 1], for
# ``jaxkd.data.BatchIterator(mean=..., std=...)``.
NORMALIZATION: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  "mnist": ((0.1307,), (0.3081,)),
  "fashion_mnist": ((0.2860,), (0.3530,)),
  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_IMAGE_SHAPE = (28, 28, 1)
_NUM_CLASSES = 10
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dimensions.
_UBYTE = 0x08


class IdxFormatError(ValueError):
  """An IDX file is corrupt, truncated or not what its name says."""


class DataNotFoundError(FileNotFoundError):
  """No prepared data, no source files and no download: nothing to build a dataset from."""


class DamagedDataError(RuntimeError):
  """The prepared (array_record) copy of a dataset cannot be read; the message names the directory to delete."""


def read_idx(path: str | os.PathLike, *, ndim: int) -> np.ndarray:
  """Reads a whole gzipped IDX file of unsigned bytes, checking it end to end.

  Args:
    path: a ``*-idx?-ubyte.gz`` file.
    ndim: the number of dimensions the file must have (3 for images, 1 for labels).

  Returns:
    uint8 array with the shape the header declares, e.g. ``[60000, 28, 28]``.

  Raises:
    IdxFormatError: the gzip stream is broken or truncated, the magic number is not
      that of an ``ndim``-dimensional ubyte file, or the data is shorter or longer
      than the header declares. The message names the file.
  """
  path = os.fspath(path)
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (EOFError, OSError, zlib.error) as e:
    # FileNotFoundError is an OSError too, but callers only pass files they found.
    raise IdxFormatError(f"{path}: not a complete gzip file ({type(e).__name__}: {e}).") from e
  header_size = 4 + 4 * ndim
  if len(raw) < 4:
    raise IdxFormatError(f"{path}: only {len(raw)} bytes after decompression, too short for an IDX header.")
  magic = int.from_bytes(raw[:4], "big")
  expected_magic = (_UBYTE << 8) | ndim
  if magic != expected_magic:
    raise IdxFormatError(
      f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
      f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})."
    )
  if len(raw) < header_size:
    raise IdxFormatError(f"{path}: truncated header, {len(raw)} bytes where the dimensions need {header_size}.")
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(shape, dtype=np.int64))
  actual = len(raw) - header_size
  if actual != expected:
    raise IdxFormatError(
      f"{path}: size mismatch, the header declares shape {shape} = {expected} bytes of data "
      f"but the file holds {actual}."
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _missing_files(directory: str) -> list[str]:
  return [name for name in IDX_FILES.values() if not os.path.isfile(os.path.join(directory, name))]


def find_idx_dir(name: str, source_dir: str | os.PathLike | None = None) -> tuple[str | None, list[str]]:
  """Finds the first directory holding all four IDX files of dataset ``name``.

  Args:
    name: ``"fashion_mnist"`` or ``"mnist"``.
    source_dir: the caller's directory, searched first.

  Returns:
    ``(directory or None, report)``, where ``report`` has one line per directory
    searched saying what it lacked, for error messages.
  """
  candidates = ([os.fspath(source_dir)] if source_dir is not None else []) + list(SYSTEM_DIRS.get(name, ()))
  report = []
  for directory in candidates:
    if not os.path.isdir(directory):
      report.append(f"{directory} (no such directory)")
      continue
    missing = _missing_files(directory)
    if not missing:
      return directory, report
    report.append(f"{directory} (missing {', '.join(missing)})")
  return None, report


def _host_resolves(url: str) -> bool:
  """Whether the URL's host resolves; a quick offline check.

  tfds's downloader retries a failed connection 10 times with exponential backoff
  (about 200 s), so an offline machine would otherwise hang before failing. Behind
  an HTTP proxy the local resolver may know nothing, so the check is skipped there.
  """
  if any(os.environ.get(var) for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
    return True
  host = urllib.parse.urlparse(url).hostname
  try:
    socket.getaddrinfo(host, None)
  except OSError:
    return False
  return True


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds builder for an MNIST-format dataset stored as four gzipped IDX files.

  Subclasses set ``DATASET`` (a key of :data:`SYSTEM_DIRS`) and ``CLASS_NAMES``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "IDX files read offline, array_record storage, Tensor features (no TensorFlow)."}
  DATASET: str = ""
  CLASS_NAMES: tuple[str, ...] = ()
  HOMEPAGE: str = ""

  def __init__(self, *, source_dir: str | os.PathLike | None = None, download: bool = True, **kwargs: Any):
    """Creates the builder.

    Args:
      source_dir: directory searched first for the four IDX files.
      download: whether to fall back to the canonical URLs when no directory has them.
      **kwargs: ``data_dir``, ``version``, ... for ``tfds.core.GeneratorBasedBuilder``.
    """
    self._source_dir = source_dir
    self._download = download
    kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
    super().__init__(**kwargs)
    # tfds points data_dir at a temporary directory while preparing; warnings name the final one.
    self._prepared_dir = os.fspath(self.data_dir)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's own code_path checks `importlib_resources.abc.Traversable` for any builder
    # defined in a package, and tfds 4.9.10 only declares importlib_resources for
    # Python < 3.9, so preparing would fail with ModuleNotFoundError
    # (tensorflow/datasets#11212). The file defining the class is tfds's own fallback.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"{self.DATASET} read from its IDX files (28x28 grayscale, 10 classes), in file order.",
      features=tfds.features.FeaturesDict(
        {
          # BYTES encoding stores the pixels as one bytes string instead of 784 int64s:
          # preparing 60k examples takes about 2 s instead of 6 s.
          "image": tfds.features.Tensor(shape=_IMAGE_SHAPE, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
          "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
        }
      ),
      supervised_keys=("image", "label"),
      homepage=self.HOMEPAGE,
      # Record i of a split is example i of the IDX file: indices mean the canonical order.
      disable_shuffling=True,
    )

  def _warn_source_dir_unused(self, report: list[str], instead: str) -> None:
    """Says that the caller's ``source_dir`` was passed over, since what is prepared now is reused from then on."""
    if self._source_dir is None:
      return
    warnings.warn(
      f"source_dir {report[0]}: preparing {self.DATASET!r} from {instead} instead. If that is not the data you "
      f"meant, fix source_dir and delete {self._prepared_dir}, which every later load reuses.",
      stacklevel=2,
    )

  def _idx_paths(self, dl_manager: tfds.download.DownloadManager) -> dict[str, str]:
    directory, report = find_idx_dir(self.DATASET, self._source_dir)
    if directory is not None:
      if self._source_dir is not None and directory != os.fspath(self._source_dir):
        self._warn_source_dir_unused(report, directory)
      return {role: os.path.join(directory, filename) for role, filename in IDX_FILES.items()}
    urls = {role: _URLS[self.DATASET] + filename for role, filename in IDX_FILES.items()}
    searched = "; ".join(report) if report else "none (no source_dir given and no system directory known)"
    hint = f"Put {', '.join(IDX_FILES.values())} in a directory and pass source_dir=<it>."
    if not self._download:
      raise DataNotFoundError(
        f"No IDX files for {self.DATASET!r}. Directories searched: {searched}. Download disabled. {hint}"
      )
    base = _URLS[self.DATASET]
    if not _host_resolves(base):
      raise DataNotFoundError(
        f"No IDX files for {self.DATASET!r}. Directories searched: {searched}. "
        f"Cannot download from {base}: host {urllib.parse.urlparse(base).hostname} does not resolve (offline?). {hint}"
      )
    self._warn_source_dir_unused(report, f"the files downloaded from {base}")
    try:
      paths = dl_manager.download(urls)
    except Exception as e:  # requests, OSError, checksum errors: all mean "no data", said once, clearly.
      raise DataNotFoundError(
        f"No IDX files for {self.DATASET!r}. Directories searched: {searched}. "
        f"Download from {base} failed ({type(e).__name__}: {e}). {hint}"
      ) from e
    return {role: os.fspath(path) for role, path in paths.items()}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[tuple[int, dict]]]:
    paths = self._idx_paths(dl_manager)
    # Read and check all four files before generating anything, so that a broken test
    # file cannot leave a prepared train split behind it.
    splits = {}
    for split, prefix in (("train", "train"), ("test", "test")):
      images = read_idx(paths[f"{prefix}_images"], ndim=3)
      labels = read_idx(paths[f"{prefix}_labels"], ndim=1)
      if images.shape[1:] != _IMAGE_SHAPE[:2]:
        raise IdxFormatError(
          f"{paths[f'{prefix}_images']}: images are {images.shape[1]}x{images.shape[2]}, "
          f"expected {_IMAGE_SHAPE[0]}x{_IMAGE_SHAPE[1]}."
        )
      if len(images) != len(labels):
        raise IdxFormatError(
          f"{paths[f'{prefix}_images']} holds {len(images)} images but {paths[f'{prefix}_labels']} holds "
          f"{len(labels)} labels."
        )
      if len(labels) and labels.max() >= _NUM_CLASSES:
        raise IdxFormatError(
          f"{paths[f'{prefix}_labels']}: label {int(labels.max())} out of range [0, {_NUM_CLASSES})."
        )
      splits[split] = (images[..., None], labels)  # [n, 28, 28, 1], [n]
    return {split: self._generate_examples(images, labels) for split, (images, labels) in splits.items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i in range(len(labels)):
      yield i, {"image": images[i], "label": int(labels[i])}


class JaxkdFashionMnist(_IdxBuilder):
  """Fashion-MNIST (Xiao et al. 2017) from its IDX files: 60000 train / 10000 test, 28x28x1, 10 classes."""

  DATASET = "fashion_mnist"
  CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
  )
  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"


class JaxkdMnist(_IdxBuilder):
  """MNIST (LeCun et al. 1998) from its IDX files: 60000 train / 10000 test, 28x28x1, 10 classes."""

  DATASET = "mnist"
  CLASS_NAMES = tuple(str(digit) for digit in range(10))
  HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"


_IDX_BUILDERS: Mapping[str, type[_IdxBuilder]] = {
  "fashion_mnist": JaxkdFashionMnist,
  "mnist": JaxkdMnist,
  JaxkdFashionMnist.name: JaxkdFashionMnist,
  JaxkdMnist.name: JaxkdMnist,
}


def builder(
  name: str,
  *,
  data_dir: str | os.PathLike | None = None,
  source_dir: str | os.PathLike | None = None,
  download: bool = True,
) -> _IdxBuilder:
  """Returns jaxkd's IDX builder for ``name``, prepared (once) under ``data_dir``.

  Args:
    name: ``"fashion_mnist"`` or ``"mnist"`` (or the registered ``"jaxkd_..."`` names).
    data_dir: tfds data directory; None means tfds's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    source_dir: directory searched first for the four IDX files.
    download: whether to fall back to the canonical URLs when no directory has the files.

  Raises:
    ValueError: ``name`` is not an IDX dataset.
    DataNotFoundError: the dataset is not prepared and no files were found or downloaded.
    IdxFormatError: an IDX file is corrupt.
  """
  if name not in _IDX_BUILDERS:
    raise ValueError(f"{name!r} is not an IDX dataset; choose one of {sorted(_IDX_BUILDERS)}.")
  idx_builder = _IDX_BUILDERS[name](data_dir=data_dir, source_dir=source_dir, download=download)
  # A no-op when the version directory exists: later runs never touch the IDX files.
  idx_builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
  return idx_builder


def load_data_source(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  source_dir: str | os.PathLike | None = None,
  download: bool = True,
) -> Sequence[dict[str, Any]]:
  """Random-access tfds data source of one split: ``source[i]`` is ``{'image': uint8 [H, W, C], 'label': int}``.

  Args:
    name: ``"fashion_mnist"``/``"mnist"`` (built from IDX files by jaxkd), or any tfds
      catalog name already prepared in ``array_record`` format under ``data_dir``.
    split: a tfds split, slices included (``"train"``, ``"test"``, ``"train[:55000]"``).
    data_dir: tfds data directory; None means tfds's default.
    source_dir: directory with the IDX files (IDX datasets only).
    download: whether IDX datasets may fall back to downloading.

  Raises:
    DataNotFoundError: no data could be found (the message names where it looked).
    IdxFormatError: an IDX file is corrupt.
    DamagedDataError: the prepared copy cannot be read (the message names the directory to delete).
    ValueError: the split is empty or not one of the dataset's.
  """
  if name in _IDX_BUILDERS:
    return _data_source(builder(name, data_dir=data_dir, source_dir=source_dir, download=download), name, split)
  if source_dir is not None:
    raise ValueError(f"source_dir is only used by the IDX datasets {sorted(SYSTEM_DIRS)}, not by {name!r}.")
  prepare = f"Prepare it first in array_record format, e.g. `tfds build {name} --file_format=array_record" + (
    f" --data_dir={os.fspath(data_dir)}`." if data_dir is not None else "`."
  )
  try:
    catalog_builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    # tfds's own message lists the whole catalog; the first line says what is wrong.
    raise DataNotFoundError(f"{str(e).splitlines()[0]} (neither an IDX dataset nor a tfds dataset).") from e
  # Catalog builders need TensorFlow to prepare, so jaxkd only reads what was prepared elsewhere.
  if not catalog_builder.is_prepared():
    raise DataNotFoundError(f"tfds dataset {name!r} is not prepared in {catalog_builder.data_dir}. {prepare}")
  file_format = catalog_builder.info.file_format
  if file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
    raise DataNotFoundError(
      f"tfds dataset {name!r} in {catalog_builder.data_dir} is stored as {file_format.value}, which has no "
      f"random access. {prepare}"
    )
  return _data_source(catalog_builder, name, split)


def _data_source(prepared: tfds.core.DatasetBuilder, name: str, split: str) -> Sequence[dict[str, Any]]:
  # array_record's own error for an empty split ("Paths sequence can not be of 0 length") names neither.
  if prepared.info.splits[split].num_examples == 0:
    sizes = ", ".join(f"{s} {info.num_examples}" for s, info in prepared.info.splits.items())
    raise ValueError(
      f"split {split!r} of {name!r} is empty (the dataset has {sizes} examples); choose a non-empty one."
    )
  try:
    return prepared.as_data_source(split=split)
  except RuntimeError as e:  # array_record reports a missing or broken file as RuntimeError.
    raise DamagedDataError(_damaged_message(name, prepared.data_dir, e)) from e


def _damaged_message(name: str, prepared_dir: Any, error: Exception) -> str:
  detail = str(error).splitlines()[0] if str(error) else ""
  again = (
    "jaxkd prepares it again from the IDX files"
    if name in _IDX_BUILDERS
    else f"then prepare it again, e.g. `tfds build {name} --file_format=array_record`"
  )
  return (
    f"the prepared copy of {name!r} in {os.fspath(prepared_dir)} cannot be read ({type(error).__name__}: "
    f"{detail[:300]}): it is damaged (an interrupted copy, a full disk, a bad disk?). Delete {os.fspath(prepared_dir)} "
    f"and load again; {again}."
  )


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A split held in memory, the form the input pipeline and the teacher-logit cache work on.

  Attributes:
    images: uint8 ``[num_examples, height, width, channels]``.
    labels: int32 ``[num_examples]``.
    num_classes: number of classes of the full dataset (filters keep the original ids).
    name: dataset name, part of cache keys.
    split: split name, part of cache keys.
    indices: int64 ``[num_examples]``, each example's index in the split as loaded
      (``split``, slice included), before any :func:`jaxkd.data.transfer_set` filter.
    filters: JSON-able descriptions of the filters applied, in order; part of cache keys.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str = ""
  split: str = ""
  indices: np.ndarray | None = None
  filters: tuple[Mapping[str, Any], ...] = ()

  def __post_init__(self):
    # Frozen, so normalised copies go in through object.__setattr__.
    images, labels = np.asarray(self.images), np.asarray(self.labels)
    if images.ndim != 4:
      raise ValueError(f"images must be [num_examples, height, width, channels], got shape {images.shape}.")
    if images.dtype != np.uint8:
      raise TypeError(f"images must be uint8, got {images.dtype}.")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels must have shape {images.shape[:1]}, got {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
      raise TypeError(f"labels must be integer class ids, got {labels.dtype}.")
    indices = np.arange(len(labels)) if self.indices is None else np.asarray(self.indices)
    if indices.shape != labels.shape:
      raise ValueError(f"indices must have shape {labels.shape}, got {indices.shape}.")
    object.__setattr__(self, "images", images)
    object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))
    object.__setattr__(self, "indices", indices.astype(np.int64, copy=False))

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    return (
      f"ArrayDataset(name={self.name!r}, split={self.split!r}, num_examples={len(self)}, "
      f"image_shape={self.images.shape[1:]}, num_classes={self.num_classes}, filters={list(self.filters)})"
    )


def _to_arrays(source: Sequence[dict[str, Any]], *, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
  n = len(source)
  if n == 0:
    raise ValueError(f"{source!r} is empty.")
  first = source[0]
  if "image" not in first or "label" not in first:
    raise ValueError(f"expected examples with 'image' and 'label' features, got {sorted(first)}.")
  image = np.asarray(first["image"])
  images = np.empty((n, *image.shape), dtype=image.dtype)
  labels = np.empty((n,), dtype=np.int32)
  # Chunks bound the list of decoded dicts held at once.
  for start in range(0, n, chunk):
    examples = source.__getitems__(range(start, min(start + chunk, n)))
    images[start : start + len(examples)] = np.stack([e["image"] for e in examples])
    labels[start : start + len(examples)] = [e["label"] for e in examples]
  if images.ndim == 3:  # Grayscale stored without a channel axis.
    images = images[..., None]
  return images, labels


def load(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  source_dir: str | os.PathLike | None = None,
  download: bool = True,
) -> ArrayDataset:
  """Loads a whole split into memory as an :class:`ArrayDataset`.

  Arguments are those of :func:`load_data_source`. Reading decodes every record once
  (about 3 s for Fashion-MNIST's 70000 examples); everything after is NumPy.

  Example (prepares ``~/tensorflow_datasets/jaxkd_fashion_mnist`` on first use)::

    train = load("fashion_mnist", "train")
    train.images.shape, train.labels.shape, train.num_classes  # (60000, 28, 28, 1), (60000,), 10

  Raises:
    Those of :func:`load_data_source`, and :class:`DamagedDataError` when a record of the prepared copy fails its
    checks while it is read (the message names the directory to delete).
  """
  source = load_data_source(name, split, data_dir=data_dir, source_dir=source_dir, download=download)
  try:
    images, labels = _to_arrays(source)
  except RuntimeError as e:  # Riegeli's "Corrupted Riegeli/records file: chunk data hash mismatch ..."
    raise DamagedDataError(_damaged_message(name, source.dataset_info.data_dir, e)) from e
  if images.dtype != np.uint8:
    raise TypeError(f"{name!r} images are {images.dtype}; the pipeline expects uint8 images.")
  num_classes = source.dataset_info.features["label"].num_classes
  canonical = _IDX_BUILDERS[name].DATASET if name in _IDX_BUILDERS else name
  return ArrayDataset(images=images, labels=labels, num_classes=num_classes, name=canonical, split=split)
