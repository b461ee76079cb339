"""Tests for CRAFT's Gaussian region/affinity targets in models.craft.targets."""

from __future__ import annotations

import numpy as np
import pytest

from models.craft.targets import (
    Word,
    affinity_boxes,
    character_boxes,
    draw_gaussian,
    gaussian_template,
    make_targets,
    quad_area,
)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.float32([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def test_template_peaks_at_one_in_the_centre_and_fades_to_the_edges() -> None:
    template = gaussian_template(64)
    assert template.max() == pytest.approx(1.0, abs=0.01)
    assert np.unravel_index(template.argmax(), template.shape) in {(31, 31), (31, 32), (32, 31), (32, 32)}
    assert template[32, 0] < 0.06 and template[0, 0] == 0.0  # edge middle faint, corners outside the circle
    np.testing.assert_allclose(template, template.T, atol=1e-6)


def test_quad_area() -> None:
    assert quad_area(_rect(0, 0, 4, 3)) == 12.0
    assert quad_area(np.float32([[0, 0], [2, 0], [2, 2], [0, 2]])[::-1]) == 4.0


def test_even_split_of_a_horizontal_word() -> None:
    chars = character_boxes(_rect(10, 20, 70, 40), 3)
    assert chars.shape == (3, 4, 2)
    np.testing.assert_allclose(chars[0], _rect(10, 20, 30, 40))
    np.testing.assert_allclose(chars[2], _rect(50, 20, 70, 40))


def test_even_split_of_a_vertical_word_runs_down_its_long_axis() -> None:
    chars = character_boxes(_rect(0, 0, 10, 40), 4)
    centres = chars.mean(axis=1)
    np.testing.assert_allclose(centres[:, 0], 5.0)
    np.testing.assert_allclose(centres[:, 1], [5, 15, 25, 35])


def test_even_split_follows_a_rotated_word() -> None:
    angle = np.radians(30)
    rotation = np.float32([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    quad = _rect(0, 0, 40, 10) @ rotation.T + 50
    centres = character_boxes(quad, 4).mean(axis=1)
    direction = (centres[-1] - centres[0]) / np.linalg.norm(centres[-1] - centres[0])
    np.testing.assert_allclose(direction, [np.cos(angle), np.sin(angle)], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.diff(centres, axis=0), axis=1), 10.0, atol=1e-4)


def test_affinity_boxes_sit_between_neighbouring_centres() -> None:
    chars = character_boxes(_rect(0, 0, 30, 12), 3)
    boxes = affinity_boxes(chars)
    assert boxes.shape == (2, 4, 2)
    # Corners: triangle centres of both characters: x at the centres 5 and 15, y at
    # a third of the way from the top/bottom edge to the centre.
    np.testing.assert_allclose(boxes[0], [[5, 2], [15, 2], [15, 10], [5, 10]], atol=1e-5)
    assert affinity_boxes(chars[:1]).shape == (0, 4, 2)


def test_draw_gaussian_takes_the_max_and_clips_at_the_border() -> None:
    heat = np.zeros((20, 20), np.float32)
    draw_gaussian(heat, _rect(-5, -5, 9, 9))  # partly outside: no error, clipped
    draw_gaussian(heat, _rect(8, 8, 16, 16))
    assert heat[12, 12] > 0.9 and heat[2, 2] > 0.9
    before = heat.copy()
    draw_gaussian(heat, _rect(10, 10, 12, 12))  # a small dim blob must not lower anything
    assert (heat >= before).all()
    draw_gaussian(heat, _rect(30, 30, 40, 40))  # entirely outside: nothing
    draw_gaussian(heat, np.float32([[1, 1], [1, 1], [1, 1], [1, 1]]))  # degenerate: nothing


def test_region_peaks_inside_each_character_and_affinity_between_neighbours() -> None:
    maps = make_targets([Word(_rect(20, 40, 100, 72), "ABCD")], 128, 128)
    region, affinity = maps.region, maps.affinity
    assert region.shape == affinity.shape == maps.mask.shape == (64, 64)
    # Half resolution: characters are 10 map px wide, centres at x = 15, 25, 35, 45, y = 28.
    for x in (15, 25, 35, 45):
        window = region[24:33, x - 4:x + 5]
        assert window.max() > 0.9
        peak_y, peak_x = np.unravel_index(window.argmax(), window.shape)
        assert abs(peak_x - 4) <= 1 and abs(peak_y - 4) <= 1
    for x in (20, 30, 40):  # the gaps between characters
        assert affinity[28, x] > 0.9
        assert region[28, x] < 0.4  # region cores stay apart
    assert affinity[28, 15] < 0.4  # affinity is low on a character centre
    assert affinity[28, 12] == 0 and affinity[28, 48] == 0  # no affinity beyond the end characters
    assert region[5, 5] == 0 and affinity[5, 5] == 0
    assert (maps.mask == 1).all()


def test_single_character_word_has_no_affinity() -> None:
    maps = make_targets([Word(_rect(20, 20, 40, 44), "A")], 64, 64)
    assert maps.region.max() > 0.9 and maps.affinity.max() == 0


def test_dont_care_words_are_masked_and_have_no_targets() -> None:
    maps = make_targets([Word(_rect(10, 10, 50, 30), "###"), Word(_rect(10, 40, 50, 60), "OK")], 64, 64)
    assert maps.mask[10, 15] == 0 and maps.mask[25, 15] == 1
    assert maps.region[3:17, 3:27].max() == 0 and maps.affinity[3:17, 3:27].max() == 0
    assert maps.region[20:30].max() > 0.9
    assert Word(_rect(0, 0, 1, 1), "  ").dont_care and not Word(_rect(0, 0, 1, 1), "a#").dont_care


def test_overlapping_words_take_the_maximum() -> None:
    one = make_targets([Word(_rect(10, 10, 50, 30), "AB")], 64, 64)
    two = make_targets([Word(_rect(30, 10, 70, 30), "CD")], 64, 64)
    both = make_targets([Word(_rect(10, 10, 50, 30), "AB"), Word(_rect(30, 10, 70, 30), "CD")], 64, 64)
    np.testing.assert_allclose(both.region, np.maximum(one.region, two.region))
    np.testing.assert_allclose(both.affinity, np.maximum(one.affinity, two.affinity))
