"""Interpolating measured kernel tables: exact at measured shapes, between them in log space,
past them in proportion to the work, and around cells that were never measured."""

from __future__ import annotations

import numpy as np
import pytest

from planner.silicon.grid import Curve, Surface


def test_a_curve_is_exact_at_measured_points_and_log_linear_between():
    curve = Curve(np.array([1.0, 4.0, 16.0]), np.array([1e-3, 2e-3, 8e-3]))
    assert curve(4.0) == pytest.approx(2e-3)
    # Halfway between 1 and 4 in log space is 2, where log-linear gives the geometric mean.
    assert curve(2.0) == pytest.approx(np.sqrt(1e-3 * 2e-3))
    assert curve.many(np.array([1.0, 2.0, 16.0])) == pytest.approx([1e-3, np.sqrt(2e-6), 8e-3])


def test_a_curve_keeps_the_smallest_time_below_and_scales_with_work_above():
    curve = Curve(np.array([2.0, 8.0]), np.array([1e-3, 3e-3]))
    assert curve(0.5) == pytest.approx(1e-3)  # a launch does not get cheaper
    assert curve(32.0) == pytest.approx(3e-3 * 4)  # four times the work at the measured rate
    assert curve.many(np.array([32.0]))[0] == pytest.approx(12e-3)


def test_a_curve_drops_unmeasured_points_and_needs_one():
    curve = Curve(np.array([1.0, 2.0, 4.0]), np.array([1e-3, np.nan, 4e-3]))
    assert curve(2.0) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="at least one"):
        Curve(np.array([1.0]), np.array([np.nan]))


def _surface() -> Surface:
    xs, ys = np.array([1.0, 2.0, 4.0]), np.array([10.0, 100.0, 1000.0])
    seconds = np.outer(xs, ys) * 1e-6  # time in proportion to batch x length
    seconds[2, 2] = np.nan  # the largest shape did not fit when measured
    return Surface(xs, ys, seconds, lambda x, y: x * y)


def test_a_surface_interpolates_bilinearly_in_log_space():
    surface = _surface()
    assert surface(2.0, 100.0) == pytest.approx(2e-4)
    assert surface(np.sqrt(2.0), np.sqrt(1000.0)) == pytest.approx(np.sqrt(2.0) * np.sqrt(1000.0) * 1e-6)
    assert not surface.extrapolates(2.0, 100.0)


def test_a_surface_fills_an_unmeasured_cell_from_the_largest_measured_below_it():
    surface = _surface()
    assert surface.extrapolates(3.0, 500.0)
    # The measured shape below (4, 1000) doing the most work is (2, 1000) or (4, 100): 2000 or
    # 400 units; scaled by work, the time stays in proportion.
    assert surface(4.0, 1000.0) == pytest.approx(4000 * 1e-6)


def test_a_surface_scales_past_its_largest_shapes_by_work():
    surface = _surface()
    assert surface(8.0, 100.0) == pytest.approx(800 * 1e-6)
    assert surface.extrapolates(8.0, 100.0)


def test_from_points_keeps_the_fastest_of_repeated_shapes():
    surface = Surface.from_points(np.array([1.0, 1.0, 2.0]), np.array([5.0, 5.0, 5.0]),
                                  np.array([3e-3, 2e-3, 4e-3]), lambda x, y: x * y)
    assert surface(1.0, 5.0) == pytest.approx(2e-3)
