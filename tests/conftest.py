"""Shared test helpers and the isolation every test gets.

Tests that need ../shared/fixtures skip with a reason when it is absent; with
PFLD_REQUIRE_FIXTURES=1 (CI, where the fixtures are always there) a missing fixture is a failure
that names the file. PFLD_FIXTURES points the suite at another fixtures folder.

Autouse: synthetic data sets are generated under a temporary cache (never ~/.cache/pfld-export),
and network connections raise (the toolchain must work offline; a library that catches the error
and carries on is still caught, because every attempt fails the test).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

# Before any test module imports onnxruntime (third-party imports sort first): the package
# switches ORT's telemetry off at import, and ORT reads that setting only once.
import pfld_export  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
FIXTURES_ENV = "PFLD_FIXTURES"
REQUIRE_ENV = "PFLD_REQUIRE_FIXTURES"
FIXTURES = Path(os.environ[FIXTURES_ENV]) if os.environ.get(FIXTURES_ENV) else ROOT.parent / "shared" / "fixtures"

# Hypothesis keeps caches (and by default an example database) in ./.hypothesis: in a temp dir
# instead, and no database, so the suite leaves the checkout as it found it. Modest example
# counts and no deadline keep the property tests fast and steady on a loaded machine.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "pfld-export-tests-hypothesis")
settings.register_profile("pfld", database=None, max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pfld")


def fixtures_required() -> bool:
    """True when a missing fixture must fail rather than skip (CI sets PFLD_REQUIRE_FIXTURES=1)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fixture_path(*parts: str) -> Path:
    """Path inside the fixtures folder, or skip the test (a user's fresh clone has no such folder);
    a failure naming the file when PFLD_REQUIRE_FIXTURES=1."""
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        if fixtures_required():
            pytest.fail(f"real-data fixture {p} is missing and {REQUIRE_ENV}=1: restore it (or point {FIXTURES_ENV} "
                        f"at a complete copy of ../shared/fixtures)", pytrace=False)
        pytest.skip(f"real-data fixture {p} is absent (../shared/fixtures exists only on project machines)")
    return p


@pytest.fixture
def fixtures_dir() -> Path:
    return fixture_path()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic-data cache for the session: a cached set is keyed by generator version, count
    and seed and is deterministic, so sharing it between tests is safe and spares regenerating it."""
    return tmp_path_factory.mktemp("pfld-export-cache")


@pytest.fixture(autouse=True)
def isolated_cache(session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Code that falls back to $PFLD_EXPORT_CACHE (else ~/.cache/pfld-export) writes here instead."""
    from pfld_export.data.specs import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(session_cache))
    return session_cache


def refuse_network(mp: pytest.MonkeyPatch, attempts: list[str]) -> None:
    """Make every outgoing connection and name lookup raise, recording it in `attempts`.
    Unix-domain sockets stay usable (local IPC is not the network)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str, real: Callable[..., Any] | None = None) -> Callable[..., Any]:
        def _raise(*args: Any, **kwargs: Any) -> Any:
            if real is not None and args and getattr(args[0], "family", None) == socket.AF_UNIX:
                return real(*args, **kwargs)
            attempts.append(f"{what}{args[1:2] if real is not None else args[:1]}")
            raise OSError(f"network disabled by the test ({what})")
        return _raise

    mp.setattr(socket.socket, "connect", refuse("connect", real_connect))
    mp.setattr(socket.socket, "connect_ex", refuse("connect", real_connect_ex))
    mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    mp.setattr(socket, "create_connection", refuse("create_connection"))


@pytest.fixture(autouse=True)
def no_network() -> Iterator[list[str]]:
    """Every test runs offline; any attempt fails the test even if the code swallowed the error."""
    attempts: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        refuse_network(mp, attempts)
        yield attempts
    if attempts:
        pytest.fail(f"the test tried to reach the network: {attempts}", pytrace=False)


# ------------------------------------------------------------------ models and faces made in the test
def synthetic_crops(n: int, seed: int, folder: Path, jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`n` procedural faces cropped to 112 px (uint8 BGR NHWC) and their points in [0, 1] of the crop.

    jitter 0: the 1.2x landmark-box crop (PFLD's training convention). jitter j > 0: the box is
    shifted by up to j of the face size and scaled by up to 1 +- j (seeded), as a detector box would
    be, so that a model must look at the face to place it."""
    import cv2

    from pfld_export.data.synthetic import SyntheticConfig, generate
    from pfld_export.preprocess import crop_from_landmarks

    res = generate(SyntheticConfig(count=n, seed=seed, image_size=160), folder)
    rng = np.random.default_rng(seed)
    crops, pts = [], []
    for r in res.records:
        span = float((r.points.max(0) - r.points.min(0)).max())
        shift, scale = rng.uniform(-jitter, jitter, 2) * span, 1.2 * rng.uniform(1 - jitter, 1 + jitter)
        crop, t = crop_from_landmarks(cv2.imread(str(r.image_path)), r.points + shift, scale, 112)
        crops.append(crop)
        pts.append(t.to_crop(r.points) / 112.0)
    return np.stack(crops), np.stack(pts).astype(np.float32)


def briefly_fitted(width: float, crops: np.ndarray, points: np.ndarray) -> torch.nn.Module:
    """A PFLD whose output follows the face: BN statistics from real-ish crops, then the FC
    layer solved by ridge regression on the landmarks (seconds, where SGD would take minutes).
    Its backbone is untrained, which makes it chaotic under int8 (about 10 px of shift): use
    `briefly_trained` where int8 fidelity is the point. Seeded (in a forked RNG state) so a test
    sees the same model on every run."""
    from pfld_export.model import build_model
    from pfld_export.preprocess import Preprocess

    with torch.random.fork_rng():
        torch.manual_seed(0)
        pfld, _ = build_model(width=width)
    x = torch.from_numpy(Preprocess().apply_nchw(crops))
    for m in pfld.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the one pass
    feats: list[torch.Tensor] = []
    hook = pfld.fc.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))
    with torch.no_grad():
        pfld.train()
        pfld(x)
        pfld.eval()
        feats.clear()
        pfld(x)
    hook.remove()
    f = torch.cat([feats[0], torch.ones(len(x), 1)], 1).double()
    y = torch.from_numpy(points.reshape(len(points), -1)).double()
    w = torch.linalg.solve(f.T @ f + 1e-3 * torch.eye(f.shape[1], dtype=torch.float64), f.T @ y)
    with torch.no_grad():
        pfld.fc.weight.copy_(w[:-1].T.float())
        pfld.fc.bias.copy_(w[-1].float())
    return pfld


def briefly_trained(width: float, crops: np.ndarray, points: np.ndarray, steps: int = 120, batch: int = 16,
                    lr: float = 3e-3, seed: int = 0) -> torch.nn.Module:
    """A PFLD trained end to end (Adam, cosine schedule, L2 on the points) for `steps` batches of
    `crops`: every layer has learned, unlike `briefly_fitted`'s, so int8 moves it about as little
    as a real checkpoint. It starts from the mean shape (FC bias) so the few steps go to placing
    the face, not to finding the mean. One torch thread, seeded in a forked RNG state."""
    from pfld_export.model import LandmarkModel, build_model
    from pfld_export.preprocess import Preprocess

    x = torch.from_numpy(Preprocess().apply_nchw(crops))
    y = torch.from_numpy(points.reshape(len(points), -1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine wait on each other
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            pfld, _ = build_model(width=width)
            with torch.no_grad():
                pfld.fc.weight.mul_(0.1)
                pfld.fc.bias.copy_(y.mean(0))
            net = LandmarkModel(pfld).train()
            opt = torch.optim.Adam(pfld.parameters(), lr=lr)
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                idx = torch.randint(0, len(x), (batch,))
                loss = ((net(x[idx]) - y[idx]) ** 2).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return pfld.eval()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: on a busy 2-core machine two OpenMP threads wait on each
    other (training steps ran 5x slower)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


TINY_POINTS = 5  # landmarks of the tiny TF network below


def smooth_crops(n: int, seed: int) -> np.ndarray:
    """Smooth random uint8 BGR crops (blurred blobs: activations behave like images, not noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 7, 7, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (112, 112), interpolation=cv2.INTER_CUBIC) for s in small])


@pytest.fixture(scope="session")
def tiny() -> Iterator[dict[str, Any]]:
    """A tiny landmark net as a TF function with constant weights (conv, depthwise, conv, two
    means, concat, dense), calibrated: the op types PFLD converts to, in seconds instead of a
    full PFLD conversion. Keys: cal (quant.graph.Calibrated), pre, val (crops), ref (float
    landmarks of val, px), calib (crops)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from pfld_export.preprocess import Preprocess
    from pfld_export.quant.graph import calibrate

    rng = np.random.default_rng(0)

    def const(*shape: int, scale: float = 1.0) -> Any:
        return tf.constant(rng.normal(0, scale, shape).astype(np.float32))

    w1, b1 = const(3, 3, 3, 8, scale=0.5), const(8, scale=0.1)
    w2, b2 = const(3, 3, 8, 1, scale=0.3), const(8, scale=0.1)
    w3, b3 = const(1, 1, 8, 16, scale=0.3), const(16, scale=0.1)
    w4, b4 = const(3, 3, 16, 4, scale=0.3), const(4, scale=0.1)
    wf, bf = const(20, 2 * TINY_POINTS, scale=0.3), const(2 * TINY_POINTS, scale=0.1)

    def net(x: Any) -> Any:
        a = tf.nn.relu(tf.nn.conv2d(x, w1, 4, "VALID") + b1)
        b = tf.nn.relu(tf.nn.depthwise_conv2d(a, w2, [1, 2, 2, 1], "VALID") + b2)
        c = tf.nn.conv2d(b, w3, 1, "VALID") + b3
        # Two branches with very different ranges meeting in a concat: PFLD's head in miniature.
        s1 = tf.reduce_mean(c, axis=[1, 2])
        s2 = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(c, w4 * 20.0, 2, "VALID") + b4 * 20.0), axis=[1, 2])
        return tf.sigmoid(tf.matmul(tf.concat([s1, s2], 1), wf) + bf)

    spec = tf.TensorSpec((1, 112, 112, 3), tf.float32, name="input")
    func = tf.function(lambda x: {"landmarks": net(x)}, input_signature=[spec]).get_concrete_function()
    pre = Preprocess()
    calib, val = smooth_crops(24, 1), smooth_crops(6, 2)
    cal = calibrate(None, func, pre.apply(calib))
    ref = np.stack([net(pre.apply(val)[i : i + 1]).numpy().reshape(TINY_POINTS, 2) * 112 for i in range(len(val))])
    yield {"cal": cal, "pre": pre, "val": val, "ref": ref, "calib": calib}


def synthetic_face(index: int = 0, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A procedural face (image BGR, 98 points) that is always available (no fixtures needed)."""
    from pfld_export.data.synthetic import SyntheticConfig, face_rng, render_face

    cfg = SyntheticConfig(max_yaw=20, max_pitch=10, max_roll=10, occlusion_prob=0, blur_prob=0,
                          face_fraction=(0.4, 0.55))
    img, pts, _, _ = render_face(face_rng(7, index), cfg, image_size=size)
    return img, pts


def annotated_faces(fixtures: Path) -> list[tuple[Path, np.ndarray]]:
    """(image, points) of every annotated fixture face: the wflw98 list file and ibug68 .pts."""
    from pfld_export.data.ibug import load_300w
    from pfld_export.data.wflw import load_wflw

    wflw, p1 = load_wflw(fixtures / "wflw98" / "list_98pt_rect_attr_test.txt")
    ibug, p2 = load_300w(fixtures / "ibug68")
    assert not p1 and not p2, p1 + p2
    return [(Path(r.image_path), np.asarray(r.points, np.float64)) for r in wflw + ibug]
