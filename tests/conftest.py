"""Test setup: 8 fake CPU devices, float32 matmuls, fresh seeds per test.

The device count must be set before JAX initialises its backend, so it happens at
import time here, before any test module imports jax.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py, infer.py

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
