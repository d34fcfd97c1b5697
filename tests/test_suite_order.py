"""The suite's slowest modules start first on the two pytest-xdist workers.

``tests/conftest.py`` sorts the collection by ``SLOWEST_FIRST``; pytest-xdist's file scheduler keeps that order
only with ``--no-loadscope-reorder`` (its default sorts the modules by their number of tests, which put the crash
test, 3 tests and ~250 s, at the very end with the other worker idle: measured 13:09 for today's tests).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SLOWEST_FIRST


def test_the_scheduler_keeps_the_collection_order(pytestconfig):
    # the option is parsed from pyproject.toml's addopts in the controller and copied to every worker
    assert pytestconfig.getoption("loadscopereorder") is False, (
        "pytest-xdist reorders modules by their number of tests: add --no-loadscope-reorder to addopts")


def test_every_module_named_slowest_first_exists():
    here = Path(__file__).parent
    missing = [name for name in SLOWEST_FIRST if not (here / name).is_file()]
    assert not missing, f"SLOWEST_FIRST names modules that are not there (renamed?): {missing}"
