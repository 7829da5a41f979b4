"""The frozen plan: resolved once, written beside its work, read back the same; one rule for as_of."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import plan
from pipeline.config import load_config
from pipeline.errors import PlanError

from .conftest import AS_OF


@pytest.fixture
def cfg(write_config):
    return load_config(
        write_config(
            {
                "sources": {"s": {"kind": "synthetic", "domain": "campus_issues", "count": 10}},
                "tilesets": {
                    "campus": {"source": "s", "profile": "campus_issues", "preset": "overview", "cell_detail": 5},
                    "other": {"source": "s", "profile": "generic", "min_count": 3},
                },
                "viewer": {"style": "https://tiles.example.org/style.json"},
            }
        )
    )


def test_a_plan_reads_back_as_it_was_written(cfg):
    frozen = plan.make(cfg, "campus", AS_OF)
    path = plan.write(frozen)
    assert path == cfg.work("campus").plan
    back = plan.read(path)
    assert back.to_json() == frozen.to_json()
    assert (back.profile, back.filters) == (frozen.profile, frozen.filters)
    assert back.settings.cell_detail == 5 and back.as_of == AS_OF and back.siblings == ("campus", "other")
    assert [entry["name"] for entry in back.site] == ["campus", "other"]
    assert back.work.root == cfg.home / "work" / "campus" and back.published.root == cfg.output / "campus"


def test_the_public_part_names_no_path(cfg):
    public = json.dumps(plan.make(cfg, "other", AS_OF).public())
    assert str(cfg.home) not in public and str(cfg.output) not in public and "tiles.example.org" not in public
    assert json.loads(public)["profile"]["min_count"] == 3  # the tileset's override, resolved


def test_as_of_is_given_else_the_tilesets_else_the_default():
    own, default = AS_OF - timedelta(days=1), datetime(2026, 1, 1, tzinfo=UTC)
    assert plan.decide_as_of(AS_OF, own, default) == AS_OF
    assert plan.decide_as_of(None, own, default) == own
    assert plan.decide_as_of(None, None, default) == default


def test_a_missing_or_broken_plan_is_a_clear_error(cfg):
    path = cfg.work("campus").plan
    with pytest.raises(PlanError, match="no plan at"):
        plan.read(path)
    path.parent.mkdir(parents=True)
    path.write_text('{"key": "campus"}')
    with pytest.raises(PlanError, match="unreadable plan"):
        plan.read(path)
    with pytest.raises(PlanError, match="unknown tileset 'nope'"):
        plan.make(cfg, "nope", AS_OF)
