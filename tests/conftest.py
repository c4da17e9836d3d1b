"""Shared pytest hooks for the shardflow test suite."""

import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# Every property test draws the same examples on every run (a failure reproduces, a pass is not luck of the
# draw) and on every rank; no per-example time limit (a loaded machine is not a failure). A test's own
# @settings overrides only what it names. Ranks of shardflow.testing do not read this file: a test run on the
# ranks under @given names derandomize=True itself.
settings.register_profile("shardflow", derandomize=True, print_blob=True, database=None, deadline=None)
settings.load_profile("shardflow")


def pytest_sessionfinish() -> None:
    """Stop pooled gloo ranks (shardflow.testing) so no worker outlives the session."""
    ranks = sys.modules.get("shardflow.testing.ranks")  # only if some test used it: avoids importing torch
    if ranks is not None:
        ranks.shutdown_pools()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine extra threads make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
