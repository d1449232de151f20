"""Property tests (hypothesis) where the code has algebra: point mappings that must invert each
other, a metric that must not care about the frame, size strings that must read back, and a
parser that must answer every text with a result, never an exception."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from pfld_export.bench.parse import parse_benchmark_output
from pfld_export.data.augment import AugmentParams, augment_points, can_mirror, geometric_matrix, unaugment_points
from pfld_export.errors import UsageError
from pfld_export.export.formats import format_size, parse_size
from pfld_export.layouts import IBUG68, WFLW98, PointLayout, custom_layout
from pfld_export.metrics import nme, normalizers
from pfld_export.preprocess import crop_from_box

LAYOUTS = (WFLW98, IBUG68, custom_layout(5), custom_layout(17))

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


def points_for(n: int, lo: float = -50.0, hi: float = 200.0) -> st.SearchStrategy[np.ndarray]:
    coord = st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)
    return st.lists(st.tuples(coord, coord), min_size=n, max_size=n).map(lambda p: np.asarray(p, np.float64))


# ----------------------------------------------------------------------- crop <-> image mapping
@given(x0=st.floats(-500, 2000), y0=st.floats(-500, 2000), w=st.floats(4, 1500), h=st.floats(4, 1500),
       scale=st.floats(0.5, 3.0), size=st.sampled_from([56, 112, 224]), pts=points_for(7, -1000, 3000))
def test_crop_and_image_points_round_trip(x0: float, y0: float, w: float, h: float, scale: float, size: int,
                                          pts: np.ndarray) -> None:
    _, t = crop_from_box(np.zeros((8, 8, 3), np.uint8), (x0, y0, x0 + w, y0 + h), scale, size)
    side = max(w, h) * scale
    back = t.to_image(t.to_crop(pts))
    assert np.allclose(back, pts, atol=1e-9 * max(1.0, np.abs(pts).max(), side))
    # The box's corners land on the crop's corners: the map is the crop, not just some invertible map.
    bx0, by0, bx1, by1 = t.box
    assert np.allclose(t.to_crop(np.array([[bx0, by0], [bx1, by1]])), [[0, 0], [size, size]], atol=1e-6 * size)


# ------------------------------------------------------------------------------ NME invariance
@st.composite
def similarity(draw: st.DrawFn) -> tuple[float, float, np.ndarray]:
    return (draw(st.floats(-math.pi, math.pi)), draw(st.floats(0.05, 20.0)),
            np.array([draw(finite), draw(finite)]))


def _apply(sim: tuple[float, float, np.ndarray], p: np.ndarray, flip: bool = False) -> np.ndarray:
    angle, s, t = sim
    r = s * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    if flip:
        r = r @ np.diag([-1.0, 1.0])
    return p @ r.T + t


def face_like(layout: PointLayout, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth (uniform in a 112 px crop) and a prediction near it, from a seed: hypothesis
    explores the transforms, numpy makes the 68/98 points cheaply."""
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0, 112, (layout.num_points, 2))
    return gt + rng.normal(0, 3, gt.shape), gt


@pytest.mark.parametrize("layout,norm", [(WFLW98, "inter-ocular"), (WFLW98, "inter-pupil"), (IBUG68, "inter-ocular"),
                                         (IBUG68, "inter-pupil")])
@given(seed=st.integers(0, 2**32 - 1), sim=similarity(), flip=st.booleans())
def test_nme_is_invariant_under_similarity_transforms(layout: PointLayout, norm: str, seed: int,
                                                      sim: tuple[float, float, np.ndarray], flip: bool) -> None:
    """Rotating, scaling, reflecting and shifting prediction and ground truth together changes no
    distance ratio, so NME (normalised by a distance between points) must not move."""
    pred, gt = face_like(layout, seed)
    assume(normalizers(gt, layout, norm)[0] > 1.0)  # degenerate annotations are refused, not measured
    before = nme(pred, gt, layout, norm)
    after = nme(_apply(sim, pred, flip), _apply(sim, gt, flip), layout, norm)
    assert np.allclose(after, before, rtol=1e-7, atol=1e-9)


@given(pts=points_for(5, 0, 112), noise=points_for(5, -5, 5), s=st.floats(0.05, 20.0), t=st.tuples(finite, finite))
def test_box_nme_is_invariant_under_scale_and_shift(pts: np.ndarray, noise: np.ndarray, s: float,
                                                    t: tuple[float, float]) -> None:
    """The box normaliser (custom layouts) is the axis-aligned box diagonal: invariant to scale and
    translation (not to rotation, by definition)."""
    layout = custom_layout(5)
    assume(normalizers(pts, layout, "box")[0] > 1.0)
    before = nme(pts + noise, pts, layout, "box")
    shift = np.asarray(t)
    assert np.allclose(nme(s * (pts + noise) + shift, s * pts + shift, layout, "box"), before, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------- mirroring
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([56, 112, 224]))
def test_mirroring_twice_is_the_identity(layout: PointLayout, seed: int, size: int) -> None:
    pts = np.random.default_rng(seed).uniform(0, size, (layout.num_points, 2))
    flip = AugmentParams(size=size, mirror=True, matrix=geometric_matrix(0.0, 1.0, (0.0, 0.0), True, size))
    if not can_mirror(layout):  # custom layouts: which point becomes which is unknown, so no flips
        with pytest.raises(UsageError, match="mirror table"):
            augment_points(pts, flip, layout)
        return
    assert sorted(layout.mirror) == list(range(layout.num_points))
    assert all(layout.mirror[layout.mirror[i]] == i for i in range(layout.num_points))
    once = augment_points(pts, flip, layout)
    assert not np.allclose(once, pts)  # a flip really moves the points (x -> size - 1 - x, re-indexed)
    assert np.allclose(augment_points(once, flip, layout), pts, atol=1e-9)


@pytest.mark.parametrize("layout", [WFLW98, IBUG68], ids=lambda l: l.name)
@given(seed=st.integers(0, 2**32 - 1), rot=st.floats(-180, 180), scale=st.floats(0.25, 4.0),
       shift=st.tuples(st.floats(-50, 50), st.floats(-50, 50)), mirror=st.booleans())
def test_unaugment_inverts_augment(layout: PointLayout, seed: int, rot: float, scale: float,
                                   shift: tuple[float, float], mirror: bool) -> None:
    pts = np.random.default_rng(seed).uniform(0, 112, (layout.num_points, 2))
    params = AugmentParams(rotation_deg=rot, scale=scale, shift=shift, mirror=mirror,
                           matrix=geometric_matrix(rot, scale, shift, mirror, 112))
    assert np.allclose(unaugment_points(augment_points(pts, params, layout), params, layout), pts, atol=1e-8)


# ------------------------------------------------------------------------------ size strings
@given(n=st.integers(min_value=1, max_value=10**12))
def test_format_size_reads_back_within_its_rounding(n: int) -> None:
    text = format_size(n)
    # format_size keeps 2 decimals of MB, 1 of KB, whole bytes: half of the last digit at most.
    step = 10_000 if n >= 1000**2 else 100 if n >= 1000 else 1
    assert abs(parse_size(text) - n) <= step / 2
    assert parse_size(text.replace(" ", "")) == parse_size(text.lower()) == parse_size(text)


@given(value=st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
       unit=st.sampled_from(["", "B", "KB", "MB", "GB", "KiB", "MiB", "GiB", "kb", "mib"]), space=st.sampled_from(["", " "]))
def test_parse_size_is_value_times_unit(value: object, unit: str, space: str) -> None:
    factor = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}[unit.lower()]
    expected = round(float(str(value)) * factor)
    if expected == 0:  # a budget of no bytes can hold no model: refused before any work
        with pytest.raises(UsageError, match="0 bytes"):
            parse_size(f"{value}{space}{unit}")
        return
    assert parse_size(f"{value}{space}{unit}") == expected
    assert parse_size(expected) == expected  # ints pass through


@given(text=st.text(max_size=20))
def test_parse_size_answers_any_text_with_a_size_or_a_usage_error(text: str) -> None:
    try:
        n = parse_size(text)
    except UsageError as e:
        assert repr(text) in str(e) and "2MB" in str(e)  # echoes the bad value and shows the fix
    else:
        assert isinstance(n, int) and n >= 1


# ------------------------------------------------------------------- benchmark_model output
_NUM = st.one_of(st.integers(-10**9, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                 st.sampled_from(["", "-", "nan", "1e400", "0x1f", "1,5"]))
_TEMPLATES = (
    "INFO: Initialized TensorFlow Lite runtime.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "INFO: Explicitly applied XNNPACK delegate, and the model graph will be completely executed by the delegate.",
    "INFO: XNNPACK delegate: {} nodes delegated out of {} nodes with {} partitions.",
    "INFO: The input model file size (MB): {}",
    "INFO: Initialized session in {}ms.",
    "INFO: Num threads: [{}]",
    "INFO: Graph: [{}]",
    "INFO: count={} first={} curr={} min={} max={} avg={} std={}",
    "INFO: Inference timings in us: Init: {}, First inference: {}, Warmup (avg): {}, Inference (avg): {}",
    "Inference timings in us: Init: {}, no stats: {}",
    "INFO: Memory footprint delta from the start of the tool (MB): init={} overall={}",
    "INFO: Overall peak memory footprint (MB) via periodic monitoring: {}",
    "INFO: Percentiles: p5={} p50={} p90={} p99={}",
    "ERROR: Node number {} (CONV_2D) failed to prepare.",
    "ERROR: Failed to apply XNNPACK delegate.",
    "Benchmarking failed.",
    "Segmentation fault",
    "CANNOT LINK EXECUTABLE \"./benchmark_model\": library \"{}\" not found",
    "{}",
)


@st.composite
def benchmark_like_text(draw: st.DrawFn) -> str:
    """Lines of real benchmark_model shapes with arbitrary values, arbitrary lines between them,
    in any order, with LF or CR LF endings: the parser's every branch sees malformed input."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        tpl = draw(st.sampled_from(_TEMPLATES))
        values = [draw(st.one_of(_NUM, st.text(max_size=8))) for _ in range(tpl.count("{}"))]
        lines.append(tpl.format(*values) if draw(st.booleans()) else draw(st.text(max_size=40)))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


def _check_parsed(text: str) -> None:
    out = parse_benchmark_output(text)
    if out.ok:
        assert out.failure_reason is None and out.inference_avg_us is not None
    else:
        assert isinstance(out.failure_reason, str) and out.failure_reason.strip()


@given(text=st.text(max_size=400))
def test_parse_benchmark_output_answers_any_text(text: str) -> None:
    _check_parsed(text)


@given(text=benchmark_like_text())
def test_parse_benchmark_output_answers_any_benchmark_like_text(text: str) -> None:
    _check_parsed(text)
