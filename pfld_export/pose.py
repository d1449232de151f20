"""Head pose (yaw, pitch, roll) from 2D landmarks with solvePnP against a 14-point 3D mean face.

Coordinate frames (both right-handed, OpenCV style):

* object (the head): +X towards the subject's LEFT (image right when they face the camera),
  +Y DOWN (brows -> chin), +Z INTO the head (away from a camera the subject faces), so the
  nose has the most negative Z. Units are centimetres (approximately: the model is PFLD-pytorch's
  generic head, outer eye corners 10.6 apart, eyes to chin 12.9).
* camera: +X image right, +Y image down, +Z forward. A frontal, upright face has rotation = I.

Angles, in degrees, with the rotation built as R = Rz(roll) @ Rx(-pitch) @ Ry(-yaw)
(read right to left: the head yaws about its own vertical axis, then pitches, then rolls in
the image plane). `rotation_matrix` and `angles_from_rotation` are exact inverses in
(-90, 90) for yaw and pitch:

* yaw   > 0: the subject turns to THEIR left (their nose moves to the image right).
* pitch > 0: the subject looks up (chin up, nose moves up in the image).
* roll  > 0: the head tilts clockwise in the image (towards the subject's left shoulder).

The synthetic generator (`data/synthetic.py`) renders with exactly these conventions and the
same camera, so `euler_from_landmarks` recovers its known angles.

Camera: focal length = image width in pixels (about 53 degrees horizontal field of view),
principal point at the image centre, no distortion. PFLD-pytorch instead used a fixed 256-px,
60-degree camera while passing landmarks normalised to 0..1 of a 112 crop, i.e. a face a
fraction of a pixel wide in the middle of a 256-px image: the estimate was effectively
orthographic and its angles biased. Here the camera is built from the actual image (or crop)
size the points are measured in. Its 3D model also mirrored left/right (and had both nostrils
at the same x); the rows below fix both and use the object frame above.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .errors import DataError
from .layouts import PointLayout

# Rows in the order of `PointLayout.pose_points` (WFLW 33, 38, 50, 46, 60, 64, 68, 72, 55, 59,
# 76, 82, 85, 16; iBUG 17, 21, 22, 26, 36, 39, 42, 45, 31, 35, 48, 54, 57, 8). "right"/"left"
# are the subject's. Values are PFLD-pytorch's (from the deepgaze head model) in the object
# frame documented above.
MEAN_FACE_3D: np.ndarray = np.array(
    [
        [-6.825897, -6.760612, -4.402142],  # right brow, outer end
        [-1.330353, -7.122144, -6.903745],  # right brow, inner end
        [1.330353, -7.122144, -6.903745],  # left brow, inner end
        [6.825897, -6.760612, -4.402142],  # left brow, outer end
        [-5.311432, -5.485328, -3.987654],  # right eye, outer corner
        [-1.789930, -5.393625, -4.413414],  # right eye, inner corner
        [1.789930, -5.393625, -4.413414],  # left eye, inner corner
        [5.311432, -5.485328, -3.987654],  # left eye, outer corner
        [-2.005628, -1.409845, -6.165652],  # right nostril (alar base)
        [2.005628, -1.409845, -6.165652],  # left nostril
        [-2.774015, 2.080775, -5.048531],  # right mouth corner
        [2.774015, 2.080775, -5.048531],  # left mouth corner
        [0.000000, 3.116408, -6.097667],  # lower lip, centre (outer edge)
        [0.000000, 7.415691, -4.070434],  # chin
    ],
    dtype=np.float64,
)
MEAN_FACE_3D.setflags(write=False)


def camera_matrix(image_size: tuple[int, int]) -> np.ndarray:
    """Pinhole camera for an image of (width, height) pixels: focal = width, centre in the middle."""
    w, h = float(image_size[0]), float(image_size[1])
    if not (w > 0 and h > 0):
        raise DataError(f"image size must be positive (width, height), got {image_size}")
    return np.array([[w, 0.0, w / 2.0], [0.0, w, h / 2.0], [0.0, 0.0, 1.0]], np.float64)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Object -> camera rotation for angles in degrees (conventions in the module docstring)."""
    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    ry = np.array([[ca, 0.0, -sa], [0.0, 1.0, 0.0], [sa, 0.0, ca]])  # Ry(-yaw)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cb, sb], [0.0, -sb, cb]])  # Rx(-pitch)
    rz = np.array([[cc, -sc, 0.0], [sc, cc, 0.0], [0.0, 0.0, 1.0]])  # Rz(roll)
    return rz @ rx @ ry


def angles_from_rotation(r: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `rotation_matrix`: (yaw, pitch, roll) in degrees."""
    r = np.asarray(r, np.float64)
    # Third row of Rz Rx(b') Ry(a') is (-cos b' sin a', sin b', cos b' cos a'), independent of roll.
    pitch = -math.degrees(math.asin(float(np.clip(r[2, 1], -1.0, 1.0))))
    yaw = math.degrees(math.atan2(r[2, 0], r[2, 2]))
    roll = math.degrees(math.atan2(-r[0, 1], r[1, 1]))
    return yaw, pitch, roll


def project(points_3d: np.ndarray, rotation: np.ndarray, translation: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Pinhole projection of object points [N, 3] with the camera of `camera_matrix(image_size)`."""
    k = camera_matrix(image_size)
    cam = np.asarray(points_3d, np.float64) @ np.asarray(rotation, np.float64).T + np.asarray(translation, np.float64)
    if np.any(cam[:, 2] <= 0):
        raise DataError("points behind the camera; move the face further away (larger translation z)")
    uv = cam[:, :2] / cam[:, 2:3]
    return uv * np.array([k[0, 0], k[1, 1]]) + k[:2, 2]


def euler_from_landmarks(points: np.ndarray, layout: PointLayout, image_size: tuple[int, int]) -> tuple[float, float, float]:
    """Head pose (yaw, pitch, roll) in degrees from landmarks in pixels.

    `points` [P, 2] are in the pixel frame of an image (or crop) of `image_size` = (width,
    height); the camera is built from that size (focal = width, centre in the middle). Only the
    layout's 14 `pose_points` are used, matched to `MEAN_FACE_3D`.
    """
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] != layout.num_points:
        raise DataError(f"expected points shaped [{layout.num_points}, 2] for layout {layout.name}, got {pts.shape}")
    if len(layout.pose_points) != len(MEAN_FACE_3D):
        raise DataError(
            f"layout {layout.name} has no head-pose points (needs {len(MEAN_FACE_3D)} matched to pose.MEAN_FACE_3D); "
            "use a wflw98 or ibug68 layout, or give the records a known pose"
        )
    img = pts[list(layout.pose_points)]
    if not np.all(np.isfinite(img)):
        raise DataError(f"non-finite landmark among the pose points of layout {layout.name}; fix the annotation")
    k = camera_matrix(image_size)
    dist = np.zeros(5)
    # SQPnP is globally optimal for the non-planar 14-point model (no bad local minimum from a
    # DLT start); a Levenberg-Marquardt refinement then polishes the reprojection error.
    ok, rvec, tvec = cv2.solvePnP(MEAN_FACE_3D, img, k, dist, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise DataError(f"solvePnP found no head pose for these landmarks (layout {layout.name}); check the points")
    rvec, tvec = cv2.solvePnPRefineLM(MEAN_FACE_3D, img, k, dist, rvec, tvec)
    rot, _ = cv2.Rodrigues(rvec)
    return angles_from_rotation(rot)
