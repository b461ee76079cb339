"""Pose keypoints: the file formats users have, and the normalisation the model sees.

Every reader returns one clip as a float32 array of shape (T, 133, 3): COCO-WholeBody
joints (body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand 112-132),
each (x, y, score). Formats read:

- `.npy`: that array itself, (T, 133, 3); read with `allow_pickle=False`.
- `.pkl`: a pickled float array of that shape, or the Uni-Sign layout, a dict with
  `keypoints` (T, [1,] 133, 2), `scores` (T, [1,] 133) and optional integer
  `start`/`end` frame bounds. Pickles are read by a restricted unpickler that only
  resolves numpy's array-reconstruction helpers (`numpy.core.multiarray._reconstruct`,
  `numpy.ndarray`, `numpy.dtype`, `numpy.core.multiarray.scalar`,
  `numpy.core.numeric._frombuffer`, their `numpy._core` twins, and `_codecs.encode`
  which protocol-2 pickles use for raw bytes); any other class or function in the
  file is refused before it is created, and object arrays are refused after.
- OpenPose: a folder with one `*.json` per frame (sorted by name); the first
  person's `pose_keypoints_2d` (BODY_25, 25x3), `face_keypoints_2d` (70x3) and
  `hand_left/right_keypoints_2d` (21x3) are mapped onto the COCO-WholeBody joints;
  a frame with no person is all zeros.

`normalise_parts` turns a clip into the four parts the model reads (seed 002's
`crop_scale`, as in Uni-Sign's `datasets.py`), never producing NaN.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np

NUM_JOINTS = 133
CLIP_SUFFIXES = (".npy", ".pkl")

# Joints of each part (COCO-WholeBody indices) and the skeleton edges between them
# (indices into the part's own list): the graph the GCN's adjacency starts from.
BODY_JOINTS = (0, 3, 4, 5, 6, 7, 8, 9, 10)  # nose, ears, shoulders, elbows, wrists
_HAND_EDGES = tuple((0, 1 + 4 * f) for f in range(5)) + tuple((1 + 4 * f + k, 2 + 4 * f + k) for f in range(5) for k in range(3))
FACE_JOINTS = tuple(range(23, 40, 2)) + tuple(range(83, 91)) + (53,)  # jaw line, inner lips, nose tip
PARTS: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = {
    "body": (BODY_JOINTS, ((0, 1), (0, 2), (0, 3), (0, 4), (3, 4), (3, 5), (5, 7), (4, 6), (6, 8))),
    "left_hand": (tuple(range(91, 112)), _HAND_EDGES),
    "right_hand": (tuple(range(112, 133)), _HAND_EDGES),
    "face": (FACE_JOINTS, tuple((i, i + 1) for i in range(8)) + tuple((9 + i, 9 + (i + 1) % 8) for i in range(8)) + tuple((17, i) for i in range(17))),
}
PART_NAMES = tuple(PARTS)
# The joint each part is expressed relative to (None: the body's own square).
_ANCHORS = {"body": None, "left_hand": 91, "right_hand": 112, "face": 53}

# OpenPose BODY_25 index of each COCO body joint 0-16, then of the six foot joints 17-22.
_BODY25_TO_COCO = (0, 16, 15, 18, 17, 5, 2, 6, 3, 7, 4, 12, 9, 13, 10, 14, 11, 19, 20, 21, 22, 23, 24)
_OPENPOSE_FIELDS = (("pose_keypoints_2d", 25), ("face_keypoints_2d", 70), ("hand_left_keypoints_2d", 21), ("hand_right_keypoints_2d", 21))


class KeypointError(ValueError):
    """A keypoint file is missing, unreadable or of the wrong shape; the message names it."""


# --------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------


def _as_clip(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise KeypointError(f"{path} holds {array.dtype} values; expected a float array of shape (T, 133, 3).")
    if array.ndim != 3 or array.shape[1:] != (NUM_JOINTS, 3):
        raise KeypointError(f"{path} has shape {array.shape}; expected (T, 133, 3): COCO-WholeBody joints x (x, y, score).")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise KeypointError(f"{path} is not a readable .npy array ({exc}).") from None
    return _as_clip(array, path)


class _Refused(pickle.UnpicklingError):
    """The pickle names something other than numpy's array helpers."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves only what numpy arrays need; anything else in the stream is refused unbuilt."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _check_plain(value, path: Path):
    """Numbers, strings, numpy arrays of numbers, and lists/tuples/dicts of those."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, path)
            _check_plain(v, path)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, path)
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise KeypointError(f"{path} holds an object array; only numeric arrays are read from .pkl files.")
    elif not isinstance(value, (int, float, str, bytes, bool, np.generic, type(None))):
        raise KeypointError(f"{path} holds a {type(value).__name__}; only numeric arrays are read from .pkl files.")


def read_pkl(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        data = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except _Refused as exc:
        raise KeypointError(f"{path} was refused: {exc}.") from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise KeypointError(f"{path} is not a readable pickle of arrays ({type(exc).__name__}: {str(exc).rstrip('.')}).") from None
    _check_plain(data, path)
    if isinstance(data, np.ndarray):
        return _as_clip(data, path)
    if not isinstance(data, dict) or "keypoints" not in data or "scores" not in data:
        raise KeypointError(f"{path} must hold a (T, 133, 3) array or a dict with 'keypoints' and 'scores' arrays.")
    xy, scores = np.asarray(data["keypoints"]), np.asarray(data["scores"])
    if xy.ndim == 4:  # (T, persons, 133, 2): the first person
        xy = xy[:, 0]
    if scores.ndim == 3:
        scores = scores[:, 0]
    if xy.ndim != 3 or xy.shape[1:] != (NUM_JOINTS, 2) or scores.shape != xy.shape[:2]:
        raise KeypointError(
            f"{path} has keypoints of shape {np.shape(data['keypoints'])} and scores of shape {np.shape(data['scores'])}; "
            "expected (T, [1,] 133, 2) and (T, [1,] 133)."
        )
    start, end = int(data.get("start", 0)), int(data.get("end", len(xy)))
    if not 0 <= start < end <= len(xy):
        raise KeypointError(f"{path} has start {start} and end {end}, not a frame range within its {len(xy)} frames.")
    return _as_clip(np.concatenate([xy, scores[..., None]], axis=-1)[start:end], path)


def _openpose_frame(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeypointError(f"{path} is not a readable OpenPose JSON file ({exc}).") from None
    frame = np.zeros((NUM_JOINTS, 3), dtype=np.float32)
    people = data.get("people") if isinstance(data, dict) else None
    if not isinstance(people, list):
        raise KeypointError(f"{path} has no 'people' list; expected OpenPose per-frame JSON.")
    if not people:
        return frame
    arrays = {}
    for key, joints in _OPENPOSE_FIELDS:
        values = people[0].get(key) or [0.0] * (joints * 3)
        if len(values) != joints * 3:
            raise KeypointError(f"{path} has {len(values)} values in '{key}'; expected {joints} x 3 = {joints * 3}.")
        try:
            arrays[key] = np.asarray(values, dtype=np.float32).reshape(joints, 3)
        except (TypeError, ValueError):
            raise KeypointError(f"{path} has non-numeric values in '{key}'.") from None
    frame[:23] = arrays["pose_keypoints_2d"][list(_BODY25_TO_COCO)]
    frame[23:91] = arrays["face_keypoints_2d"][:68]  # the last two are pupils, not in COCO-WholeBody
    frame[91:112] = arrays["hand_left_keypoints_2d"]
    frame[112:133] = arrays["hand_right_keypoints_2d"]
    return frame


def openpose_frames(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".json" and p.is_file())


def read_openpose(folder: str | Path) -> np.ndarray:
    folder = Path(folder)
    frames = openpose_frames(folder)
    if not frames:
        raise KeypointError(f"the OpenPose folder {folder} holds no .json frame files.")
    return np.stack([_openpose_frame(p) for p in frames])


def read_clip(path: str | Path) -> np.ndarray:
    """One clip as (T, 133, 3) float32 from any supported format (chosen by suffix / folder)."""
    path = Path(path)
    if path.is_dir():
        clip = read_openpose(path)
    elif path.suffix == ".npy":
        clip = read_npy(path)
    elif path.suffix == ".pkl":
        clip = read_pkl(path)
    else:
        raise KeypointError(f"{path} is not a .npy, .pkl or OpenPose JSON folder.")
    if len(clip) == 0:
        raise KeypointError(f"{path} holds no frames.")
    return clip


def clip_length(path: str | Path) -> int:
    """Frames in a clip, cheaply where the format allows (an .npy header, a file count)."""
    path = Path(path)
    if path.is_dir():
        return len(openpose_frames(path))
    if path.suffix == ".npy":
        try:
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        except (OSError, ValueError, IndexError) as exc:
            raise KeypointError(f"{path} is not a readable .npy array ({exc}).") from None
    return len(read_clip(path))


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------


def crop_scale(points: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """Map (..., V, 3) points into [-1, 1] by the square around their confident joints.

    The square is centred on the bounding box of joints with score > threshold
    and as wide as its longer side. Joints at or below the threshold become 0.
    With fewer than 4 confident joints, or a box of size 0, the result is all
    zeros and the scale 0 (seed 002's NaN came from dividing by that 0).
    """
    out = np.zeros_like(points, dtype=np.float32)
    confident = points[..., 2] > threshold
    xy = points[..., :2][confident]
    if len(xy) < 4:
        return out, 0.0
    low, high = xy.min(axis=0), xy.max(axis=0)
    scale = float((high - low).max())
    if not scale > 0:
        return out, 0.0
    corner = (low + high - scale) / 2
    out[..., :2] = np.clip((points[..., :2] - corner) / scale * 2 - 1, -1, 1)
    out[..., 2] = points[..., 2]
    out[~confident] = 0
    return out, scale


def sanitise(clip: np.ndarray) -> np.ndarray:
    """Joints with a non-finite coordinate or score become (0, 0, 0): not confident."""
    bad = ~np.isfinite(clip).all(axis=-1)
    if bad.any():
        clip = clip.copy()
        clip[bad] = 0
    return clip


def normalise_parts(clip: np.ndarray, threshold: float = 0.3) -> dict[str, np.ndarray]:
    """The four parts of a (T, 133, 3) clip as {part: (T, V, 3) float32}, all finite.

    The body goes through `crop_scale` over the whole clip; hands (relative to
    their wrist) and face (relative to the nose tip) are divided by the same
    square's half-width, so every part shares the body's units, then clipped to
    [-1, 1]. Joints at or below `threshold`, and hand/face frames whose anchor
    joint is not confident, are 0. If the body has no usable square, every part
    is 0.
    """
    clip = sanitise(np.asarray(clip, dtype=np.float32))
    body, scale = crop_scale(clip[:, list(BODY_JOINTS)], threshold)
    parts = {"body": body}
    for name in PART_NAMES[1:]:
        joints = clip[:, list(PARTS[name][0])]
        out = np.zeros_like(joints)
        if scale > 0:
            anchor = clip[:, _ANCHORS[name]]  # (T, 3)
            out[..., :2] = np.clip((joints[..., :2] - anchor[:, None, :2]) / (scale / 2), -1, 1)
            out[..., 2] = joints[..., 2]
            out[joints[..., 2] <= threshold] = 0
            out[anchor[:, 2] <= threshold] = 0
        parts[name] = out
    return parts


def skeleton_adjacency(name: str) -> np.ndarray:
    """Symmetrically normalised adjacency D^-1/2 (A + I) D^-1/2 of a part's skeleton graph."""
    joints, edges = PARTS[name]
    a = np.eye(len(joints), dtype=np.float32)
    for i, j in edges:
        a[i, j] = a[j, i] = 1.0
    d = 1.0 / np.sqrt(a.sum(axis=1))
    return (a * d[:, None] * d[None, :]).astype(np.float32)
