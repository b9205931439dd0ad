"""The image experiments' data: fit/validation/test splits of a dataset and its pixel statistics."""

from __future__ import annotations

import ml_collections

from experiments._cli import ConfigError


def pixel_stats(dataset: str) -> tuple[float, float]:
  """Mean and standard deviation of pixel / 255 for one-channel datasets (jaxkd.data.datasets.NORMALIZATION)."""
  from jaxkd.data.datasets import NORMALIZATION

  if dataset not in NORMALIZATION:
    return 0.5, 0.25
  (mean,), (std,) = NORMALIZATION[dataset]
  return mean, std


def load_splits(config: ml_collections.ConfigDict):
  """``(fit, validation, test)`` ArrayDatasets: validation is the last ``config.validation_size`` training examples.

  ``config.train_subset`` (when > 0) keeps a deterministic random subset of the fit split.
  """
  from jaxkd import data as data_lib
  from jaxkd.data import datasets

  kwargs = {"data_dir": config.data_dir or None, "source_dir": config.source_dir or None}
  num_train = len(datasets.load_data_source(config.dataset, "train", **kwargs))
  # A validation_size past the split would slice from the end (train[:-5]) and quietly shrink the fit split.
  if not 0 < config.validation_size < num_train:
    raise ConfigError(
      f"validation_size={config.validation_size} must leave examples to train on: {config.dataset!r} has "
      f"{num_train} training examples, so use 1 to {num_train - 1}."
    )
  num_fit = num_train - config.validation_size
  if config.train_subset > num_fit:
    raise ConfigError(
      f"train_subset={config.train_subset} is more than the {num_fit} training examples left after "
      f"validation_size={config.validation_size}; use at most {num_fit} (0: all of them)."
    )
  fit_set = datasets.load(config.dataset, f"train[:{num_fit}]", **kwargs)
  val_set = datasets.load(config.dataset, f"train[{num_fit}:]", **kwargs)
  test_set = datasets.load(config.dataset, "test", **kwargs)
  if config.get("test_subset", 0) > len(test_set):
    raise ConfigError(
      f"test_subset={config.test_subset} is more than the {len(test_set)} test examples; use at most "
      f"{len(test_set)} (0: all of them)."
    )
  if config.get("test_subset"):
    test_set = data_lib.transfer_set(test_set, num_examples=config.test_subset, seed=0)
  if config.train_subset:
    fit_set = data_lib.transfer_set(fit_set, num_examples=config.train_subset, seed=0)
  return fit_set, val_set, test_set
