"""tools/mutants.py plants named defects and runs the tests that must catch them (too slow for the default
suite: run it by hand). Here only its snippets are checked, so that a refactor which moves one is noticed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutant_snippet_is_in_its_file_once():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    assert spec is not None and spec.loader is not None
    mutants = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mutants  # dataclasses read their module's namespace while the class is made
    spec.loader.exec_module(mutants)
    assert len(mutants.MUTANTS) >= 10
    for m in mutants.MUTANTS:
        assert (ROOT / m.path).read_text().count(m.old) == 1, (m.name, m.path)
        assert all(t.startswith("tests/") for t in m.tests), m.name
