"""jax.export of a student: the artifact runs in a process without jaxkd or Flax, on any batch size."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import optax

from jaxkd.models import ResNet
from jaxkd.state import create_train_state
from jaxkd.training import export


def test_export_runs_without_jaxkd(tmp_path):
  model = ResNet(stage_sizes=(1,), widths=(4,), stem_width=4)
  state = create_train_state(model, optax.adam(1e-2), np.zeros((2, 4, 4, 1), np.float32), rng=0)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images = np.random.default_rng(0).standard_normal((3, 4, 4, 1)).astype(np.float32)
  expected = model.apply(variables, images, train=False)
  path = export.export_forward(model.apply, variables, images, tmp_path / "student.jaxexport")
  np.save(tmp_path / "images.npy", images)
  # A fresh interpreter that cannot import jaxkd or flax: only jax and numpy.
  script = textwrap.dedent(
    f"""
    import sys
    sys.modules["jaxkd"] = None
    sys.modules["flax"] = None
    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open({str(path)!r}, "rb").read()))
    images = np.load({str(tmp_path / "images.npy")!r})
    np.save({str(tmp_path / "out.npy")!r}, np.asarray(exported.call(images)))
    np.save({str(tmp_path / "out1.npy")!r}, np.asarray(exported.call(images[:1])))
    """
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env, cwd=pathlib.Path(tmp_path))
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.load(tmp_path / "out1.npy"), expected[:1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(export.load_exported(path)(images), expected, rtol=1e-5, atol=1e-6)
