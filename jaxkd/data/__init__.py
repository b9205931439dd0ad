"""Data for distillation: datasets, batches, augmentation and the teacher-logit cache.

==================  ====================================================================
module              job
==================  ====================================================================
``datasets``        datasets as arrays (tfds builders for the IDX files on disk), typed errors
``batches``         host batches: shuffling, per-process rows, stacking, device prefetch
``augment``         augmentation, host side (``translate``) and device side (in the step)
``logit_cache``     the teacher's logits computed once, keyed by the teacher and the data
==================  ====================================================================
"""

from jaxkd.data import augment, batches, datasets, logit_cache
from jaxkd.data.augment import (
  Augment,
  compose,
  cutmix,
  mixup,
  random_crop,
  random_flip,
  random_translate,
  translate,
)
from jaxkd.data.batches import (
  BatchIterator,
  DevicePrefetcher,
  StackedBatches,
  normalize,
  shard_bounds,
  stack,
  transfer_set,
)
from jaxkd.data.datasets import ArrayDataset, DamagedDataError, DataNotFoundError, IdxFormatError, load
from jaxkd.data.logit_cache import cached_teacher_logits, compute_teacher_logits

__all__ = [
  "ArrayDataset",
  "Augment",
  "BatchIterator",
  "DamagedDataError",
  "DataNotFoundError",
  "DevicePrefetcher",
  "IdxFormatError",
  "StackedBatches",
  "augment",
  "batches",
  "cached_teacher_logits",
  "compose",
  "compute_teacher_logits",
  "cutmix",
  "datasets",
  "load",
  "logit_cache",
  "mixup",
  "normalize",
  "random_crop",
  "random_flip",
  "random_translate",
  "shard_bounds",
  "stack",
  "transfer_set",
  "translate",
]
