"""tools/mutants.py plants named defects and runs the tests that must catch them (too slow for the default
suite: run it by hand). Here its snippets and test ids are checked, so that a refactor which moves a snippet
or renames a test is noticed, rather than the mutant being reported broken only when someone runs it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    assert spec is not None and spec.loader is not None
    mutants = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mutants  # dataclasses read their module's namespace while the class is made
    spec.loader.exec_module(mutants)
    return mutants.MUTANTS


def test_every_mutant_snippet_is_in_its_file_once():
    found = _mutants()
    assert len(found) >= 10
    for m in found:
        assert (ROOT / m.path).read_text().count(m.old) == 1, (m.name, m.path)
        assert all(t.startswith("tests/") for t in m.tests), m.name


def test_every_mutant_names_tests_that_exist():
    ids = sorted({t for m in _mutants() for t in m.tests})
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *ids]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
