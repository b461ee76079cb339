"""Keypoint readers on real files (.npy, .pkl, OpenPose JSON; broken and malicious
ones too) and the crop_scale normalisation that must never produce NaN."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from models.translator.keypoints import (
    PARTS, KeypointError, clip_length, crop_scale, normalise_parts, read_clip, read_openpose, read_pkl, skeleton_adjacency,
)
from models.translator.model import PoseFrontEnd
from models.translator.synthetic import make_clip, word_templates


def random_clip(frames: int = 12, seed: int = 0) -> np.ndarray:
    return make_clip([0, 1, 2, 3], word_templates(4, seed), np.random.default_rng(seed))[:frames]


# ---------------------------------------------------------------- crop_scale


def test_crop_scale_maps_confident_joints_into_the_unit_square():
    points = np.array([[[0, 0, 0.9], [10, 0, 0.9], [10, 20, 0.9], [0, 20, 0.9], [500, 500, 0.1]]], dtype=np.float32)
    out, scale = crop_scale(points, 0.3)
    assert scale == 20.0
    # A 10 x 20 box in a 20-wide square centred on it: x spans [-0.5, 0.5], y spans [-1, 1].
    np.testing.assert_allclose(out[0, :4, :2], [[-0.5, -1], [0.5, -1], [0.5, 1], [-0.5, 1]], atol=1e-6)
    assert (out[0, 4] == 0).all()  # not confident: zeroed, not clipped to the border
    np.testing.assert_allclose(out[0, :4, 2], 0.9)


@pytest.mark.parametrize("case", ["all_zero", "three_confident", "one_point_scale_zero", "nan_and_inf"])
def test_crop_scale_and_parts_are_zero_never_nan_without_a_usable_square(case):
    clip = np.zeros((6, 133, 3), dtype=np.float32)
    if case == "three_confident":
        clip[0, [0, 5, 6], :] = [[10, 10, 0.9], [40, 80, 0.9], [90, 80, 0.9]]
    elif case == "one_point_scale_zero":
        clip[:, [0, 3, 4, 5, 6], :] = [50, 50, 0.9]  # many confident joints, all at one spot
    elif case == "nan_and_inf":
        clip[:] = np.nan
        clip[:, :, 0] = np.inf
    parts = normalise_parts(clip)
    for name, array in parts.items():
        assert np.isfinite(array).all(), name
        assert (array == 0).all(), name


def test_parts_are_finite_and_bounded_on_a_clip_with_zero_frames():
    clip = random_clip(20)
    clip[3] = 0  # a frame where the detector found no one
    clip[7, 91:112] = np.nan  # a broken hand
    parts = normalise_parts(clip)
    assert set(parts) == set(PARTS)
    for name, array in parts.items():
        assert array.shape == (20, len(PARTS[name][0]), 3)
        assert np.isfinite(array).all() and np.abs(array[..., :2]).max() <= 1
        assert (array[3] == 0).all()
    assert (parts["left_hand"][7] == 0).all()
    assert np.abs(parts["body"][..., :2]).max() == pytest.approx(1.0)  # the square's border is reached


def test_hands_are_relative_to_the_wrist_and_face_to_the_nose():
    clip = random_clip(8)
    shifted = clip.copy()
    shifted[:, 91:112, :2] += 7.0  # move only the left hand: body square unchanged
    a, b = normalise_parts(clip), normalise_parts(shifted)
    np.testing.assert_allclose(a["left_hand"], b["left_hand"], atol=1e-5)
    assert (a["left_hand"][:, 0, :2] == 0).all() and (a["face"][:, -1, :2] == 0).all()


def test_front_end_gives_finite_features_for_all_zero_clips():
    parts = {name: torch.from_numpy(array)[None] for name, array in normalise_parts(np.zeros((10, 133, 3), np.float32)).items()}
    front = PoseFrontEnd(32, 8, 2, 5, "batch", "sinusoidal", 16).eval()
    out = front(parts, torch.ones(1, 10))
    assert out.shape == (1, 10, 32) and torch.isfinite(out).all()


def test_adjacency_is_symmetric_normalised_with_self_loops():
    for name in PARTS:
        a = skeleton_adjacency(name)
        assert np.allclose(a, a.T) and (np.diag(a) > 0).all()
        assert np.linalg.eigvalsh(a).max() == pytest.approx(1.0, abs=1e-5)  # D^-1/2 (A + I) D^-1/2


# ---------------------------------------------------------------- readers


def test_npy_and_pkl_read_the_same_clip(tmp_path):
    clip = random_clip(9)
    np.save(tmp_path / "c.npy", clip)
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(clip))
    # Uni-Sign's layout: keypoints (T, 1, 133, 2), scores (T, 1, 133), an optional frame range.
    uni = {"keypoints": clip[:, None, :, :2].astype(np.float64), "scores": clip[:, None, :, 2], "start": np.int64(2), "end": 7}
    (tmp_path / "u.pkl").write_bytes(pickle.dumps(uni, protocol=2))
    np.testing.assert_array_equal(read_clip(tmp_path / "c.npy"), clip)
    np.testing.assert_array_equal(read_pkl(tmp_path / "a.pkl"), clip)
    np.testing.assert_allclose(read_pkl(tmp_path / "u.pkl"), clip[2:7], atol=1e-6)
    assert clip_length(tmp_path / "c.npy") == 9 and clip_length(tmp_path / "u.pkl") == 5


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"keypoints": _Exploit(str(marker)), "scores": np.zeros((1, 133))}))
    with pytest.raises(KeypointError, match=r"evil\.pkl was refused: refusing to load posix\.mkdir"):
        read_pkl(tmp_path / "evil.pkl")
    assert not marker.exists()
    (tmp_path / "obj.pkl").write_bytes(pickle.dumps(np.array([{"a": 1}, None], dtype=object)))
    with pytest.raises(KeypointError, match="object array"):
        read_pkl(tmp_path / "obj.pkl")


@pytest.mark.parametrize("name,payload,message", [
    ("shape.npy", np.zeros((5, 17, 3), np.float32), r"shape \(5, 17, 3\); expected \(T, 133, 3\)"),
    ("text.npy", np.array([["a"] * 3] * 133)[None], "holds <U1 values"),
    ("trunc.npy", b"\x93NUMPY garbage", "not a readable .npy"),
    ("bad.pkl", b"not a pickle at all", "not a readable pickle"),
    ("dict.pkl", pickle.dumps({"points": np.zeros((2, 133, 3))}), "'keypoints' and 'scores'"),
    ("range.pkl", pickle.dumps({"keypoints": np.zeros((4, 133, 2)), "scores": np.zeros((4, 133)), "start": 3, "end": 9}), "start 3 and end 9"),
    ("clip.mp4", b"", r"not a \.npy, \.pkl"),
])
def test_broken_clip_files_are_named(tmp_path, name, payload, message):
    path = tmp_path / name
    if isinstance(payload, np.ndarray):
        np.save(path, payload)
        path = path if path.suffix == ".npy" else path.with_suffix(path.suffix + ".npy")
    else:
        path.write_bytes(payload)
    with pytest.raises(KeypointError, match=message) as info:
        read_clip(path)
    assert path.name in str(info.value)


def openpose_frame(person: dict | None) -> dict:
    return {"version": 1.3, "people": [] if person is None else [person]}


def test_openpose_json_maps_onto_coco_wholebody(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    body = np.zeros((25, 3))
    body[4] = [400, 300, 0.9]  # BODY_25 RWrist -> COCO right_wrist (10)
    body[7] = [100, 300, 0.8]  # LWrist -> left_wrist (9)
    body[17] = [280, 120, 0.7]  # REar -> right_ear (4)
    body[22] = [300, 700, 0.6]  # RBigToe -> right_big_toe (20)
    face = np.arange(70 * 3, dtype=float).reshape(70, 3)
    left = np.full((21, 3), 1.0)
    right = np.full((21, 3), 2.0)
    person = {"pose_keypoints_2d": body.ravel().tolist(), "face_keypoints_2d": face.ravel().tolist(),
              "hand_left_keypoints_2d": left.ravel().tolist(), "hand_right_keypoints_2d": right.ravel().tolist()}
    (folder / "x_000000000001_keypoints.json").write_text(json.dumps(openpose_frame(None)))
    (folder / "x_000000000000_keypoints.json").write_text(json.dumps(openpose_frame(person)))
    clip = read_openpose(folder)
    assert clip.shape == (2, 133, 3)
    np.testing.assert_allclose(clip[0, 10], [400, 300, 0.9])
    np.testing.assert_allclose(clip[0, 9], [100, 300, 0.8])
    np.testing.assert_allclose(clip[0, 4], [280, 120, 0.7])
    np.testing.assert_allclose(clip[0, 20], [300, 700, 0.6])
    np.testing.assert_allclose(clip[0, 23:91], face[:68])
    assert (clip[0, 91:112] == 1).all() and (clip[0, 112:133] == 2).all()
    assert (clip[1] == 0).all()  # nobody found in the second frame
    assert clip_length(folder) == 2


@pytest.mark.parametrize("content,message", [
    ("{not json", "not a readable OpenPose JSON"),
    (json.dumps({"frames": []}), "no 'people' list"),
    (json.dumps(openpose_frame({"pose_keypoints_2d": [0.0] * 54})), "54 values in 'pose_keypoints_2d'; expected 25 x 3"),
    (json.dumps(openpose_frame({"face_keypoints_2d": ["x"] * 210})), "non-numeric values in 'face_keypoints_2d'"),
])
def test_broken_openpose_frames_are_named(tmp_path, content, message):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "f_000.json").write_text(content)
    with pytest.raises(KeypointError, match=message) as info:
        read_clip(folder)
    assert "f_000.json" in str(info.value)
    (folder / "f_000.json").unlink()
    with pytest.raises(KeypointError, match="holds no .json frame files"):
        read_clip(folder)
