"""Fixtures: freshly seeded Allego demo stores in a temporary folder, per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.allego.seed import DemoManifest, seed_demo_stores
from connectors.base import Connector
from connectors.registry import close_all, load_connectors

DEMO_PEOPLE = 60  # enough for look-alikes and other people's comments, quick to seed


@pytest.fixture
def demo(tmp_path: Path) -> DemoManifest:
    return seed_demo_stores(tmp_path, people=DEMO_PEOPLE, seed=7)


@pytest.fixture
def stores(demo: DemoManifest) -> Iterator[dict[str, Connector]]:
    connectors = load_connectors(None, Path(demo.data_dir))
    yield connectors
    close_all(connectors)
