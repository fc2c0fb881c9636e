"""pytest plugin: `family_dirs(name)` -> a tiny saved model folder of that family, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import BUILDERS
from tiny_more_families import BUILDERS as MORE_BUILDERS

ALL_BUILDERS = {**BUILDERS, **MORE_BUILDERS}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Lazily built, cached per session: family_dirs("qwen2_vl") -> folder."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = ALL_BUILDERS[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get
