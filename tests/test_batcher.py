"""How the micro-batcher sizes the pieces of a large request: ``CallCost`` fits a model's
predict time (a fixed cost per call plus a cost per row) to the batches it scored, and a piece
is the most rows predicted to fit the time budget. Synthetic costs, no timing."""

from __future__ import annotations

import pytest

from mloop.serving.batcher import CallCost

BUDGET = 0.020


def _serve_large_requests(cost: CallCost, *, fixed: float, per_row: float, calls: int,
                          least: int = 64) -> list[int]:
    """The piece sizes a run of large requests gets, each piece's time measured exactly."""
    sizes = []
    for _ in range(calls):
        rows = cost.rows_within(BUDGET, least=least)
        cost.observe(rows, fixed + per_row * rows)
        sizes.append(rows)
    return sizes


def test_before_any_measurement_a_piece_is_max_batch_rows() -> None:
    assert CallCost().rows_within(BUDGET, least=64) == 64


@pytest.mark.parametrize(("fixed", "per_row"), [
    (0.007, 2.4e-6),   # a scikit-learn pipeline: the call dominates small batches
    (3e-5, 1.8e-6),    # a compiled graph: almost no fixed cost
    (0.001, 5e-5),     # a slow model per row
])
def test_pieces_converge_to_the_most_rows_that_fit_the_budget(fixed: float, per_row: float
                                                             ) -> None:
    ideal = int((BUDGET - fixed) / per_row)
    sizes = _serve_large_requests(CallCost(), fixed=fixed, per_row=per_row, calls=12)
    assert sizes[0] == 64
    assert sizes[-1] == pytest.approx(ideal, rel=0.01)
    assert all(fixed + per_row * n <= BUDGET * 1.01 for n in sizes[1:]), sizes


def test_pieces_grow_at_most_eight_fold_past_the_largest_measured_batch() -> None:
    sizes = _serve_large_requests(CallCost(), fixed=0.0, per_row=1e-8, calls=4)
    assert sizes == [64, 512, 4096, 32768]


def test_a_larger_batch_that_happened_to_be_faster_does_not_make_the_next_piece_huge() -> None:
    """Timing noise: 90 rows measured faster than 64. No negative cost per row is read into
    that; the next piece is what the latest one's time per row allows, within the budget."""
    cost = CallCost()
    cost.observe(64, 0.0100)
    cost.observe(90, 0.0044)
    assert cost.rows_within(BUDGET, least=64) == int(BUDGET * 90 / 0.0044)


def test_a_stale_fit_does_not_hold_pieces_that_finish_well_within_the_budget() -> None:
    """Two noisy small batches said 125 µs a row; pieces of the size that fit then take
    5 ms (the call's fixed cost, 1 µs a row), all alike, so they cannot refit the slope.
    They grow anyway, because their own time per row allows it."""
    cost = CallCost()
    cost.observe(64, 0.004)
    cost.observe(128, 0.012)
    sizes = []
    for _ in range(8):
        rows = cost.rows_within(BUDGET, least=64)
        cost.observe(rows, 0.005 + 1e-6 * rows)
        sizes.append(rows)
    assert sizes[-1] == pytest.approx((BUDGET - 0.005) / 1e-6, rel=0.01)


def test_a_piece_never_falls_below_max_batch_rows_for_a_slow_model() -> None:
    sizes = _serve_large_requests(CallCost(), fixed=0.05, per_row=1e-3, calls=5)
    assert sizes == [64] * 5


def test_a_flood_of_one_row_batches_keeps_the_fit_learned_from_large_ones() -> None:
    fixed, per_row = 0.007, 2.4e-6
    cost = CallCost()
    _serve_large_requests(cost, fixed=fixed, per_row=per_row, calls=12)
    learned = cost.rows_within(BUDGET, least=64)
    for _ in range(10_000):
        cost.observe(1, fixed + per_row)
    assert cost.rows_within(BUDGET, least=64) == pytest.approx(learned, rel=0.01)


def test_one_row_batches_between_pieces_do_not_throw_the_fit_off() -> None:
    fixed, per_row = 0.007, 2.4e-6
    cost = CallCost()
    for _ in range(30):
        rows = cost.rows_within(BUDGET, least=64)
        cost.observe(rows, fixed + per_row * rows)
        for _ in range(5):
            cost.observe(1, fixed + per_row)
    assert cost.estimate() == pytest.approx((fixed, per_row), rel=1e-6)
    assert cost.rows_within(BUDGET, least=64) == pytest.approx((BUDGET - fixed) / per_row,
                                                               rel=0.01)
