"""The README's code blocks run as written: each ```python block, in order, in one namespace.

A block may use data it does not build (``images``, ``tokens``, ``batches``...); ``PRELUDES`` gives those, small
and random, before the block that first reads them. Everything else a block uses comes from the blocks before it,
so a renamed function, a moved module or a changed signature in the README fails here.
"""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"

PRELUDES = {
  # "Distil your own model": Fashion-MNIST-shaped rows of this process.
  2: """
rng = np.random.default_rng(0)
images = rng.standard_normal((8, 28, 28, 1)).astype(np.float32)
labels = rng.integers(0, 10, 8).astype(np.int32)
batches = [(images, labels)]
""",
  # "Distil a language model": token windows and their next-token labels.
  3: """
rng = np.random.default_rng(1)
windows = rng.integers(0, 8192, (4, 65)).astype(np.int32)
tokens, labels = windows[:, :-1], windows[:, 1:]
""",
  # On-policy distillation: prompts with the data's continuations.
  5: """
student_module, teacher_module = student.linen_module, teacher.linen_module
eos = 2
prompt, completion = rng.integers(3, 8192, (4, 8)), rng.integers(3, 8192, (4, 16))
prompts_and_answers = [{"prompt": prompt.astype(np.int32), "completion": completion.astype(np.int32)}]
""",
}


def python_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_blocks_this_test_knows():
  blocks = python_blocks(README.read_text())
  assert len(blocks) >= max(PRELUDES), f"README has {len(blocks)} python blocks; PRELUDES names block {max(PRELUDES)}"


def test_readme_code_blocks_run():
  namespace: dict = {"np": np}
  for number, block in enumerate(python_blocks(README.read_text()), start=1):
    if number in PRELUDES:
      exec(PRELUDES[number], namespace)
    try:
      exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    except Exception as error:  # name the block: the traceback's file is the block
      pytest.fail(f"README python block {number} failed: {type(error).__name__}: {error}\n{block}")
