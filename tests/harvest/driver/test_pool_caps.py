"""The in-flight cap follows the workers that still have units (harvest.driver.pool.cap_shares)."""

from __future__ import annotations

from harvest.driver.pool import cap_shares


def test_one_unit_gets_the_whole_cap():
    # A 1,500-prompt job at 2,000 rows per shard is one unit: its worker must not stop at 32.
    assert cap_shares([1, 0], 64) == {0: 64}


def test_busy_workers_split_the_cap_evenly_rounding_up():
    assert cap_shares([2, 1], 64) == {0: 32, 1: 32}
    assert cap_shares([1, 1, 1], 64) == {0: 22, 1: 22, 2: 22}
    assert cap_shares([0, 0, 1], 8) == {2: 8}


def test_no_busy_worker_no_share():
    assert cap_shares([0, 0], 64) == {}


def test_small_units_run_enough_at_once_to_fill_the_in_flight_cap():
    from harvest.driver.pool import units_at_once

    assert units_at_once(32, 1, 1, 2000) == 2  # big units: one finishing, one starting
    assert units_at_once(32, 1, 1, 4) == 9  # 8 units of 4 rows fill 32, one more to start
    assert units_at_once(32, 1, 2, 4) == 5  # each of 2 workers holds half the cap
    assert units_at_once(8, 3, 2, 1) == 13  # three endpoints, single-row units
