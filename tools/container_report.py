"""Print the container self-check's table from pytest's JUnit report; exit 1 when a check failed or errored.

    python tools/container_report.py REPORT.xml [--pytest-rc RC] [--gpu-listed]

One row per test: check, status (passed / FAILED / ERROR / skipped), seconds, and its numbers (the ``detail``
property a test records) or its skip reason / failure message. ``--gpu-listed`` (``nvidia-smi -L`` lists a GPU):
every check must run there, so a skipped check is a failure (status ``FAILED(skip)``, with the skip's reason, e.g.
Transformer Engine does not import and why); only a machine without a GPU may report skips and exit 0. The one
exception is a check the GPU itself cannot run: a test that skips with a reason starting ``NOT_APPLICABLE`` (the
FP8 checks, where Transformer Engine says this GPU has no FP8, e.g. an A100) is ``n/a`` there, listed with TE's
reason and counted apart; it neither fails nor passes the self-check.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# the start of a skip reason that marks a check this GPU cannot run (tests/test_te.py: Transformer Engine's own
# FP8 availability answer); anything else skipped on a GPU machine is a failure
NOT_APPLICABLE = "not applicable on this GPU:"


def rows(report: Path) -> list[tuple[str, str, str, str]]:
    """(check, status, seconds, detail) of every test case in the JUnit report."""
    found = []
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        detail = " ".join(p.get("value", "") for p in case.iter("property") if p.get("name") == "detail")
        status = "passed"
        for tag, name in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                status = name
                message = (element.get("message") or element.text or "").strip().splitlines()
                detail = (message[0] if message else "") if tag == "skipped" else (detail + " " + (
                    message[0] if message else "")).strip()
                break
        found.append((f"{module}::{case.get('name')}", status, f"{float(case.get('time', 0)):.1f}", detail))
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the table; the exit status says whether every check passed or was skipped."""
    parser = argparse.ArgumentParser(description="container self-check table")
    parser.add_argument("report", type=Path)
    parser.add_argument("--pytest-rc", type=int, default=0)
    parser.add_argument("--gpu-listed", action="store_true",
                        help="nvidia-smi -L lists a GPU here: a skipped check fails the self-check")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"container check: no report at {args.report} (pytest rc {args.pytest_rc}); see the pytest log")
        return 1
    table = rows(args.report)
    if args.gpu_listed:  # a GPU machine: a check that did not run proves nothing, whatever its reason
        table = [(check, _on_a_gpu(status, detail), seconds, detail) for check, status, seconds, detail in table]
    if not table:
        print(f"container check: the report {args.report} holds no test (pytest rc {args.pytest_rc})")
        return 1
    widths = [max(len(row[i]) for row in [("check", "status", "s", ""), *table]) for i in range(3)]
    print(f"{'check':<{widths[0]}}  {'status':<{widths[1]}}  {'s':>{widths[2]}}  numbers / reason")
    for check, status, seconds, detail in table:
        print(f"{check:<{widths[0]}}  {status:<{widths[1]}}  {seconds:>{widths[2]}}  {detail}")
    statuses = ("passed", "FAILED", "FAILED(skip)", "ERROR", "skipped", "n/a")
    counts = {status: sum(row[1] == status for row in table) for status in statuses}
    print(", ".join(f"{n} {status.lower()}" for status, n in counts.items() if n))
    bad = counts["FAILED"] + counts["FAILED(skip)"] + counts["ERROR"]
    # pytest exits 5 when every test was deselected; 0/1 otherwise here: anything else is a collection problem
    if bad or args.pytest_rc not in (0, 1):
        skipped = f", {counts['FAILED(skip)']} skipped on a GPU machine" if counts["FAILED(skip)"] else ""
        print(f"container check: FAILED ({bad} failing checks{skipped}, pytest rc {args.pytest_rc})")
        return 1
    not_applicable = f" ({counts['n/a']} checks not applicable on this GPU)" if counts["n/a"] else ""
    print(f"container check: OK{not_applicable}")
    return 0


def _on_a_gpu(status: str, detail: str) -> str:
    """A check's status where a GPU is listed: skipped is FAILED(skip), unless the GPU cannot run it (n/a)."""
    if status != "skipped":
        return status
    return "n/a" if detail.startswith(NOT_APPLICABLE) else "FAILED(skip)"


if __name__ == "__main__":
    sys.exit(main())
