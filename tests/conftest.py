"""Test-wide set-up: four fake CPU devices, before anything starts JAX's backends.

Data-parallel tests compare pmap and shard_map over 4 devices with one device; on a
CPU-only machine those devices are XLA's host-platform fakes.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# Tests must never reach a dataset host or a hub.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")
