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
