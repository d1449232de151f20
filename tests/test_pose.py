from __future__ import annotations

import numpy as np
import pytest

from pfld_export.errors import DataError
from pfld_export.layouts import IBUG68, WFLW98, custom_layout
from pfld_export.pose import MEAN_FACE_3D, angles_from_rotation, euler_from_landmarks, project, rotation_matrix


def _face_points(layout, yaw: float, pitch: float, roll: float, t=(5.0, -3.0, 40.0), size=(256, 256)) -> np.ndarray:
    pts = np.full((layout.num_points, 2), 100.0)
    pts[list(layout.pose_points)] = project(MEAN_FACE_3D, rotation_matrix(yaw, pitch, roll), np.array(t), size)
    return pts


def test_rotation_round_trip() -> None:
    rng = np.random.default_rng(1)
    for yaw, pitch, roll in rng.uniform([-80, -80, -170], [80, 80, 170], (50, 3)):
        r = rotation_matrix(yaw, pitch, roll)
        assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)
        assert np.allclose(angles_from_rotation(r), (yaw, pitch, roll))


@pytest.mark.parametrize("layout", [WFLW98, IBUG68], ids=lambda l: l.name)
def test_recovers_known_pose(layout) -> None:
    rng = np.random.default_rng(2)
    for yaw, pitch, roll in rng.uniform([-50, -30, -40], [50, 30, 40], (25, 3)):
        got = euler_from_landmarks(_face_points(layout, yaw, pitch, roll), layout, (256, 256))
        assert np.allclose(got, (yaw, pitch, roll), atol=0.01), (got, (yaw, pitch, roll))


def test_sign_conventions_in_the_image() -> None:
    nose = np.array([[0.0, 0.0, -10.0]])  # a point in front of the face
    t = np.array([0.0, 0.0, 40.0])

    def at(y: float, p: float, r: float) -> np.ndarray:
        return project(nose, rotation_matrix(y, p, r), t, (256, 256))[0]

    centre = at(0, 0, 0)
    assert at(20, 0, 0)[0] > centre[0]  # yaw > 0: subject turns to their left -> nose to image right
    assert at(0, 20, 0)[1] < centre[1]  # pitch > 0: looks up -> nose up in the image
    eyes = MEAN_FACE_3D[[4, 7]]  # right and left outer eye corners
    right, left = project(eyes, rotation_matrix(0, 0, 20), t, (256, 256))
    assert left[1] > right[1]  # roll > 0: clockwise in the image, the subject's left eye drops


def test_camera_follows_the_image_size() -> None:
    # focal = width: the same face photographed at twice the resolution has the same pose.
    pts = _face_points(WFLW98, 25, -10, 8, size=(200, 160))
    a = euler_from_landmarks(pts, WFLW98, (200, 160))
    b = euler_from_landmarks(pts * 2, WFLW98, (400, 320))
    assert np.allclose(a, b, atol=1e-6) and np.allclose(a, (25, -10, 8), atol=0.01)


def test_bad_input_is_a_data_error() -> None:
    with pytest.raises(DataError, match="shaped"):
        euler_from_landmarks(np.zeros((68, 2)), WFLW98, (256, 256))
    with pytest.raises(DataError, match="no head-pose points"):
        euler_from_landmarks(np.zeros((17, 2)), custom_layout(17), (256, 256))
    pts = _face_points(WFLW98, 0, 0, 0)
    pts[60] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        euler_from_landmarks(pts, WFLW98, (256, 256))
    with pytest.raises(DataError, match="positive"):
        euler_from_landmarks(_face_points(WFLW98, 0, 0, 0), WFLW98, (0, 256))
