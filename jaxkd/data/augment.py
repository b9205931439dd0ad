r"""Image augmentations computed inside the train step, so that teacher and student see the same view.

Beyer et al. (2022) found that a distilled student keeps improving for very long schedules only when the teacher
is *consistent*: it must see exactly the augmented image the student sees (aggressive mixup, crops, flips), not
its own independently augmented copy nor the clean image. :func:`jaxkd.make_train_step` applies
``augment(batch, key, rows) -> batch`` once, on device, at the start of the step; teacher and student both read
the array it returns::

  augment = jaxkd.data.augment.compose(random_translate(max_shift=2), random_flip(), mixup(alpha=1.0))
  step = jaxkd.make_train_step(teacher_apply_fn=teacher, objective=..., augment=augment)

Every function here builds such an ``augment``. They are pure and jit-able, and they do not depend on how the
batch is split over devices:

* ``key`` is the same on every device (the step derives it from ``state.rng`` and ``state.step``, so a resumed run
  draws what an uninterrupted one would);
* ``rows`` are the examples' int32 rows in the global batch; each example's draws come from
  ``jax.random.fold_in(key, row)``, never from its position in the device's share;
* the mixing partner of row :math:`r` is row :math:`r \oplus 1` (:func:`mixup`, :func:`cutmix`).

So one device, a mesh of any size and ``pmap`` augment each example identically (tests/test_augment.py).
Inside :func:`compose` augmentation ``i`` draws from ``fold_in(key, i)``.

Mixing augmentations add two batch entries, read by :func:`jaxkd.objective.cross_entropy`: ``'mix_label'``
(:data:`jaxkd.objective.MIX_LABEL`, the partner's int label) and ``'mix_weight'``
(:data:`jaxkd.objective.MIX_WEIGHT`, :math:`\lambda`, float32 ``[batch]``), so that its loss is
:math:`\lambda\,\mathrm{CE}(y) + (1-\lambda)\,\mathrm{CE}(y')`. Teacher terms need nothing: the teacher's
logits are those of the mixed image. The step's ``ce`` and ``accuracy`` metrics still use ``'label'``.

Host-side augmentation lives here too, at the end of the file: :func:`translate` (whole-pixel shifts with zero
fill), which :class:`jaxkd.data.BatchIterator` applies with ``max_translation`` (and flips with
``horizontal_flip``); it augments before the teacher runs as well, but cannot mix examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.objective import IGNORE_INDEX, MIX_LABEL, MIX_WEIGHT

__all__ = ["Augment", "compose", "cutmix", "mixup", "random_crop", "random_flip", "random_translate", "translate"]

# augment(batch, key, rows) -> batch, as make_train_step(augment=...) calls it.
Augment = Callable[[Mapping[str, Any], jax.Array, jax.Array], dict[str, Any]]


# ---------------------------------------------------------------------------------------------------------------------
# Checks (trace time, static shapes) and shared pieces.


def _check_probability(p: Any, name: str = "p") -> float:
  if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}.")
  return float(p)


def _check_alpha(alpha: Any) -> float:
  if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
    raise ValueError(f"alpha must be a finite number > 0 (the Beta(alpha, alpha) parameter), got {alpha!r}.")
  return float(alpha)


def _check_pixels(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{name} must be an int >= 0 (pixels), got {value!r}.")
  return value


def _images(batch: Mapping[str, Any], image_key: str, rows: Any, what: str) -> jax.Array:
  """``batch[image_key]`` as an array, after the checks every augmentation opens with."""
  if not isinstance(batch, Mapping):
    raise ValueError(f"{what}: a batch must be a dict of arrays, got {type(batch).__name__}.")
  if image_key not in batch:
    raise ValueError(
      f"{what}: the batch has no entry {image_key!r} (it has {sorted(batch)}); pass image_key= to name the images."
    )
  images = jnp.asarray(batch[image_key])
  if images.ndim != 4:
    raise ValueError(
      f"{what}: batch[{image_key!r}] must be images [batch, height, width, channels], got shape {images.shape}."
    )
  rows_shape = jnp.shape(rows)
  if rows_shape != images.shape[:1] or not jnp.issubdtype(jnp.result_type(rows), jnp.integer):
    raise ValueError(
      f"{what}: rows must be int [batch] global row indices, one per image; got {jnp.result_type(rows)} "
      f"{rows_shape} for images of shape {images.shape}."
    )
  return images


def _example_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
  """One key per example, ``fold_in(key, row)``: the same draws whichever device holds the row."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(rows, jnp.int32))


def _swap_pairs(x: jax.Array) -> jax.Array:
  """Swaps positions 2i and 2i+1 along axis 0: each row's value at its partner's position."""
  return jnp.flip(x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), axis=1).reshape(x.shape)


def _beta(key: jax.Array, alpha: float) -> jax.Array:
  """One draw of Beta(alpha, alpha), float32."""
  if alpha == 1.0:  # Beta(1, 1) is uniform: one draw instead of two gamma rejection loops.
    return jax.random.uniform(key, (), jnp.float32)
  return jax.random.beta(key, alpha, alpha, (), jnp.float32)


def _mixing_draws(
  key: jax.Array, rows: jax.Array, *, alpha: float, p: float, per_batch: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(lam [batch] float32, applied [batch] bool, extra keys [batch])`` for mixup and cutmix.

  ``applied`` is False with probability ``1 - p`` (the callers also leave out padding partners). Per example every
  draw comes from ``fold_in(key, row)``; with ``per_batch`` lam and applied come from ``key`` alone.
  """
  size = jnp.shape(rows)[0]
  if per_batch:
    lam_key, apply_key, extra_key = jax.random.split(key, 3)
    lam = jnp.broadcast_to(_beta(lam_key, alpha), (size,))
    applied = jnp.broadcast_to(jax.random.bernoulli(apply_key, p), (size,))
    extra = _example_keys(extra_key, rows)
  else:
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(_example_keys(key, rows))  # [batch, 3]
    lam = jax.vmap(lambda k: _beta(k, alpha))(keys[:, 0])
    applied = jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys[:, 1])
    extra = keys[:, 2]
  return lam, applied, extra


def _mixing_labels(batch: Mapping[str, Any], label_key: str, mask_key: str, size: int, what: str):
  """``(labels, partner_labels, partner_ok)``; ValueError for an odd batch, missing labels or a second mix."""
  if MIX_LABEL in batch or MIX_WEIGHT in batch:
    raise ValueError(
      f"{what}: the batch is already mixed (it has {MIX_LABEL!r}); apply one mixing augmentation per step "
      "(mixup or cutmix, not both: a mixed label of three examples has no single partner)."
    )
  if size % 2:
    raise ValueError(
      f"{what} pairs rows 2i and 2i+1 of each device's batch, so the per-device batch must be even, got {size}."
    )
  if label_key not in batch:
    raise ValueError(
      f"{what}: the batch has no labels {label_key!r} (it has {sorted(batch)}); pass label_key= to name them."
    )
  labels = jnp.asarray(batch[label_key])
  if labels.shape != (size,) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"{what}: batch[{label_key!r}] must be int class labels [batch] = [{size}], got {labels.dtype} {labels.shape}."
    )
  partner_labels = _swap_pairs(labels)
  partner_ok = partner_labels != IGNORE_INDEX
  if mask_key in batch:
    mask = jnp.asarray(batch[mask_key])
    if mask.shape != (size,):
      raise ValueError(f"{what}: batch[{mask_key!r}] must be a mask [batch] = [{size}], got shape {mask.shape}.")
    partner_ok &= _swap_pairs(mask.astype(jnp.bool_))
  return labels, partner_labels, partner_ok


def _mixed_batch(batch, image_key, images, labels, partner_labels, lam) -> dict[str, Any]:
  # Where nothing was mixed (lam == 1) the partner label is the example's own, so it is always a class (ignored
  # ones as class 0, as the step treats them) and the (1 - lam) CE term is exactly 0.
  own = jnp.where(labels == IGNORE_INDEX, 0, labels)
  mix_label = jnp.where(lam < 1.0, partner_labels, own).astype(labels.dtype)
  return {**batch, image_key: images, MIX_LABEL: mix_label, MIX_WEIGHT: lam.astype(jnp.float32)}


# ---------------------------------------------------------------------------------------------------------------------
# Mixing augmentations.


def mixup(
  *,
  alpha: float = 1.0,
  p: float = 1.0,
  per_batch: bool = False,
  image_key: str = "image",
  label_key: str = "label",
  mask_key: str = "mask",
) -> Augment:
  r"""Mixup: each image a convex combination with its partner's, the label likewise.

  .. math::
    \tilde x_r = \lambda_r x_r + (1 - \lambda_r)\, x_{r \oplus 1}, \qquad
    \lambda_r \sim \mathrm{Beta}(\alpha, \alpha),

  and the loss :math:`\lambda_r\,\mathrm{CE}(y_r) + (1-\lambda_r)\,\mathrm{CE}(y_{r \oplus 1})`
  (:func:`jaxkd.objective.cross_entropy` reads ``batch['mix_label']`` :math:`= y_{r \oplus 1}` and
  ``batch['mix_weight']`` :math:`= \lambda_r`). With probability :math:`1 - p` an example is left as it is
  (:math:`\lambda_r = 1`). Beyer et al. distil with mixup at :math:`p = 1` ("function matching").

  The partner of global row :math:`r` is row :math:`r \oplus 1` (rows 2i and 2i+1 of each device's batch swap),
  which does not depend on the placement; the per-device batch must therefore be even (ValueError otherwise),
  and on shuffled data it is a random pairing. A partner that is padding (``batch[mask_key]`` False) or has an
  ignored label (-100) is never mixed in. Mixing twice in one step (mixup then cutmix) is a ValueError.

  Args:
    alpha: :math:`\alpha` of the Beta distribution; 1 is uniform :math:`\lambda`, below 1 most draws lie
      near 0 or 1 (one image dominates).
    p: probability of mixing an example.
    per_batch: one :math:`\lambda` (and one decision to mix) for the whole global batch, drawn from ``key``
      alone, as in Zhang et al.'s implementation; False draws them per example.
    image_key: the images ``[batch, height, width, channels]``, floating.
    label_key: the int labels ``[batch]`` (the step's ``label_key``).
    mask_key: the padding mask ``[batch]``, if the batch has one (the step's ``mask_key``).

  Returns:
    ``augment(batch, key, rows) -> batch`` with the mixed images (same dtype), ``'mix_label'`` (the partner's
    label where mixed, the example's own otherwise) and ``'mix_weight'`` (:math:`\lambda`, float32 ``[batch]``).

  >>> import jax, jax.numpy as jnp
  >>> batch = {'image': jnp.arange(2.0).reshape(2, 1, 1, 1), 'label': jnp.array([3, 7])}
  >>> out = mixup(alpha=1.0)(batch, jax.random.key(0), jnp.arange(2))
  >>> out['mix_label'].tolist()
  [7, 3]

  References:
    Zhang et al., *mixup: Beyond Empirical Risk Minimization*, ICLR 2018.
    Beyer et al., *Knowledge distillation: A good teacher is patient and consistent*, CVPR 2022.
  """
  alpha, p = _check_alpha(alpha), _check_probability(p)

  def augment(batch: Mapping[str, Any], key: jax.Array, rows: jax.Array) -> dict[str, Any]:
    images = _images(batch, image_key, rows, "mixup")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(
        f"mixup: batch[{image_key!r}] must be floating images to be mixed, got {images.dtype}; normalise first."
      )
    size = images.shape[0]
    labels, partner_labels, partner_ok = _mixing_labels(batch, label_key, mask_key, size, "mixup")
    lam, applied, _ = _mixing_draws(key, rows, alpha=alpha, p=p, per_batch=per_batch)
    lam = jnp.where(applied & partner_ok, lam, 1.0)  # [batch]
    weight = lam[:, None, None, None]
    mixed = weight * images.astype(jnp.float32) + (1.0 - weight) * _swap_pairs(images).astype(jnp.float32)
    return _mixed_batch(batch, image_key, mixed.astype(images.dtype), labels, partner_labels, lam)

  return augment


def cutmix(
  *,
  alpha: float = 1.0,
  p: float = 1.0,
  per_batch: bool = False,
  image_key: str = "image",
  label_key: str = "label",
  mask_key: str = "mask",
) -> Augment:
  r"""CutMix: a box of the partner's image pasted into each image, the label mixed by the box's area.

  Draw :math:`\lambda_r \sim \mathrm{Beta}(\alpha, \alpha)`; the box has sides
  :math:`\lfloor H\sqrt{1-\lambda_r}\rfloor \times \lfloor W\sqrt{1-\lambda_r}\rfloor`, a uniformly random centre,
  and is clipped to the image; the pixels inside it come from the partner :math:`x_{r \oplus 1}`. The label weight
  is then recomputed from the box actually pasted,

  .. math::
    \lambda_r = 1 - \frac{(y_1 - y_0)(x_1 - x_0)}{H W},

  and the loss is :math:`\lambda_r\,\mathrm{CE}(y_r) + (1-\lambda_r)\,\mathrm{CE}(y_{r \oplus 1})`, as for
  :func:`mixup`, whose partner rule, ``p``, ``per_batch`` (one box size for the batch, positions still per
  example), padding rule and batch entries this shares.

  >>> import jax, jax.numpy as jnp
  >>> batch = {'image': jnp.zeros((2, 4, 4, 1)), 'label': jnp.array([0, 1])}
  >>> out = jax.jit(cutmix())(batch, jax.random.key(0), jnp.arange(2))  # jit-able, as in the step
  >>> out['mix_weight'].shape, out['mix_weight'].dtype
  ((2,), dtype('float32'))

  References:
    Yun et al., *CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features*, ICCV 2019.
    Beyer et al., *Knowledge distillation: A good teacher is patient and consistent*, CVPR 2022.
  """
  alpha, p = _check_alpha(alpha), _check_probability(p)

  def augment(batch: Mapping[str, Any], key: jax.Array, rows: jax.Array) -> dict[str, Any]:
    images = _images(batch, image_key, rows, "cutmix")
    size, height, width, _ = images.shape
    labels, partner_labels, partner_ok = _mixing_labels(batch, label_key, mask_key, size, "cutmix")
    lam, applied, box_keys = _mixing_draws(key, rows, alpha=alpha, p=p, per_batch=per_batch)
    cut = jnp.sqrt(1.0 - lam)  # [batch]
    cut_h = jnp.where(applied & partner_ok, jnp.floor(height * cut), 0.0).astype(jnp.int32)
    cut_w = jnp.where(applied & partner_ok, jnp.floor(width * cut), 0.0).astype(jnp.int32)
    centres = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, jnp.array([height, width])))(box_keys)  # [batch, 2]
    y0 = jnp.clip(centres[:, 0] - cut_h // 2, 0, height)
    y1 = jnp.clip(centres[:, 0] - cut_h // 2 + cut_h, 0, height)
    x0 = jnp.clip(centres[:, 1] - cut_w // 2, 0, width)
    x1 = jnp.clip(centres[:, 1] - cut_w // 2 + cut_w, 0, width)
    ys, xs = jnp.arange(height), jnp.arange(width)
    inside_y = (ys >= y0[:, None]) & (ys < y1[:, None])  # [batch, height]
    inside_x = (xs >= x0[:, None]) & (xs < x1[:, None])  # [batch, width]
    inside = inside_y[:, :, None, None] & inside_x[:, None, :, None]  # [batch, height, width, 1]
    mixed = jnp.where(inside, _swap_pairs(images), images)
    lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
    return _mixed_batch(batch, image_key, mixed, labels, partner_labels, lam)

  return augment


# ---------------------------------------------------------------------------------------------------------------------
# Geometric augmentations (labels untouched).


def random_translate(*, max_shift: int = 2, image_key: str = "image") -> Augment:
  r"""Shifts each image by whole pixels, uniformly in :math:`[-s, s]` along each axis, filling with zeros.

  .. math::
    \tilde x[i, j] = x[i - \delta_y, j - \delta_x] \text{ (0 outside the image)}, \qquad
    \delta_y, \delta_x \sim \mathcal{U}\{-s, \dots, s\},

  the convention of :func:`jaxkd.data.translate`. Zero is the fill of normalised images' mean only if they were
  centred; this is the usual "pad and crop" of CIFAR training (:func:`random_crop`).

  Args:
    max_shift: :math:`s`, pixels.
    image_key: the images ``[batch, height, width, channels]``.

  >>> import jax, jax.numpy as jnp
  >>> image = jnp.ones((1, 3, 3, 1))
  >>> out = random_translate(max_shift=1)({'image': image}, jax.random.key(0), jnp.arange(1))
  >>> out['image'].shape
  (1, 3, 3, 1)
  """
  max_shift = _check_pixels(max_shift, "max_shift")

  def augment(batch: Mapping[str, Any], key: jax.Array, rows: jax.Array) -> dict[str, Any]:
    images = _images(batch, image_key, rows, "random_translate")
    if max_shift == 0:
      return dict(batch)
    _, height, width, channels = images.shape
    shifts = jax.vmap(lambda k: jax.random.randint(k, (2,), -max_shift, max_shift + 1))(_example_keys(key, rows))
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))

    def crop(image: jax.Array, shift: jax.Array) -> jax.Array:
      start = (max_shift - shift[0], max_shift - shift[1], 0)
      return jax.lax.dynamic_slice(image, start, (height, width, channels))

    return {**batch, image_key: jax.vmap(crop)(padded, shifts)}

  return augment


def random_crop(*, padding: int = 4, image_key: str = "image") -> Augment:
  """Pads each image with ``padding`` zeros on every side and crops a random window of its size.

  The window's offset is uniform in ``[0, 2 * padding]`` along each axis, which is exactly
  :func:`random_translate` with ``max_shift=padding`` (and draws the same shifts for the same key); the name
  of the CIFAR recipe (pad 4, crop 32).
  """
  return random_translate(max_shift=_check_pixels(padding, "padding"), image_key=image_key)


def random_flip(*, p: float = 0.5, image_key: str = "image") -> Augment:
  """Flips each image left-right with probability ``p``.

  >>> import jax, jax.numpy as jnp
  >>> image = jnp.arange(3.0).reshape(1, 1, 3, 1)
  >>> random_flip(p=1.0)({'image': image}, jax.random.key(0), jnp.arange(1))['image'][0, 0, :, 0].tolist()
  [2.0, 1.0, 0.0]
  """
  p = _check_probability(p)

  def augment(batch: Mapping[str, Any], key: jax.Array, rows: jax.Array) -> dict[str, Any]:
    images = _images(batch, image_key, rows, "random_flip")
    flip = jax.vmap(lambda k: jax.random.bernoulli(k, p))(_example_keys(key, rows))  # [batch]
    return {**batch, image_key: jnp.where(flip[:, None, None, None], jnp.flip(images, axis=2), images)}

  return augment


def compose(*augmentations: Augment) -> Augment:
  """Applies the augmentations in order, augmentation ``i`` with the key ``fold_in(key, i)``.

  Put geometric ones before a mixing one (``compose(random_translate(), random_flip(), mixup())``): the mixed
  image is then a mix of two augmented images, and one mixing augmentation per step is allowed.
  """
  if not augmentations:
    raise ValueError("compose needs at least one augmentation.")
  for i, augmentation in enumerate(augmentations):
    if not callable(augmentation):
      raise TypeError(f"augmentation {i} must be a function augment(batch, key, rows) -> batch, got {augmentation!r}.")

  def augment(batch: Mapping[str, Any], key: jax.Array, rows: jax.Array) -> dict[str, Any]:
    batch = dict(batch)
    for i, augmentation in enumerate(augmentations):
      batch = dict(augmentation(batch, jax.random.fold_in(key, i), rows))
    return batch

  return augment


# ---------------------------------------------------------------------------------------------------------------------
# Host side: NumPy, applied by jaxkd.data.BatchIterator before a batch reaches the step.


def translate(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
  """Shifts each image by whole pixels, filling uncovered pixels with 0.

  Args:
    images: ``[batch, height, width, channels]``.
    shifts: int ``[batch, 2]``: ``(dy, dx)`` per image; ``out[y, x] = images[y - dy, x - dx]``.

  Returns:
    Array of the same shape and dtype.

  >>> translate(np.arange(1, 4).reshape(1, 1, 3, 1), np.array([[0, 1]]))[0, 0, :, 0]
  array([0, 1, 2])
  """
  batch, height, width, _ = images.shape
  pad = int(np.abs(shifts).max(initial=0))
  if pad == 0:
    return images.copy()
  padded = np.zeros((batch, height + 2 * pad, width + 2 * pad, images.shape[3]), dtype=images.dtype)
  padded[:, pad : pad + height, pad : pad + width] = images
  out = np.empty_like(images)
  # One slice copy per distinct shift (at most (2 * pad + 1) ** 2) rather than per image:
  # about 3x faster than a per-pixel fancy-index gather at batch 128.
  distinct, group = np.unique(shifts, axis=0, return_inverse=True)
  for g, (dy, dx) in enumerate(distinct):
    members = np.flatnonzero(group.reshape(-1) == g)
    out[members] = padded[members, pad - dy : pad - dy + height, pad - dx : pad - dx + width]
  return out
