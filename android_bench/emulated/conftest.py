"""Fixtures for the emulated-ARM rig tests (run by `make test-arm` inside the rig's netns only).

The rig script exports PFLD_RIG_SERIAL, PFLD_RIG_SERIAL2 and PFLD_RIG_BENCHMARK_MODEL; without them (e.g. someone
runs pytest on this folder by hand outside the rig) every test skips with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def rig_serial() -> str:
    serial = os.environ.get("PFLD_RIG_SERIAL")
    if not serial:
        pytest.skip("not inside the emulated-ARM rig (PFLD_RIG_SERIAL unset): run `make test-arm`")
    return serial


@pytest.fixture(scope="session")
def rig_serial2() -> str:
    """The rig's second adbd "device" (same arm64 userland, its own /data/local/tmp)."""
    serial = os.environ.get("PFLD_RIG_SERIAL2")
    if not serial:
        pytest.skip("the rig's second device is not running (PFLD_RIG_SERIAL2 unset): run `make test-arm`")
    return serial


@pytest.fixture(scope="session")
def runner() -> Path:
    return Path(os.environ.get("PFLD_RIG_BENCHMARK_MODEL", HERE / "benchmark_model"))


def _pfld_like_keras(points: int = 98):
    """A small network with PFLD's layer kinds (strided conv, depthwise, inverted residual with
    add, global mean of two scales, concat, dense head) at 112x112x3 -> 2*points."""
    import tensorflow as tf

    L = tf.keras.layers
    inp = L.Input((112, 112, 3), batch_size=1, name="input")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, 2, padding="same", use_bias=False)(inp)))
    x = L.ReLU()(L.DepthwiseConv2D(3, padding="same")(x))
    y = L.ReLU()(L.Conv2D(32, 1)(x))
    y = L.DepthwiseConv2D(3, padding="same")(y)
    y = L.Conv2D(16, 1)(y)
    x = L.Add()([x, y])
    s1 = L.GlobalAveragePooling2D()(x)
    x2 = L.ReLU()(L.Conv2D(32, 3, 2, padding="same")(x))
    s2 = L.GlobalAveragePooling2D()(x2)
    h = L.Concatenate()([s1, s2])
    out = L.Dense(points * 2, name="landmarks")(h)
    return tf.keras.Model(inp, out)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 and full-int8 (int8 I/O) .tflite files of a PFLD-shaped network, built here with
    tf.lite.TFLiteConverter (no download: weights are seeded, calibration is generated)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(7)
    model = _pfld_like_keras()
    out = tmp_path_factory.mktemp("rig_models")
    paths: dict[str, Path] = {}
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    paths["fp32"] = out / "pfldlike_fp32.tflite"
    paths["fp32"].write_bytes(conv.convert())

    rng = np.random.default_rng(11)

    def calib():
        for _ in range(16):
            yield [rng.random((1, 112, 112, 3), dtype=np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = calib
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    paths["int8"] = out / "pfldlike_int8.tflite"
    paths["int8"].write_bytes(conv.convert())
    return paths
