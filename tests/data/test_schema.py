from __future__ import annotations

from pathlib import Path

import pytest

from shopmtl.data.schema import ALL, FeatureSpec, ScenarioSpec, Schema, TaskSpec

SCEN = ScenarioSpec("scenario", ("home", "search", "ad"))
FEATS = (FeatureSpec("user_id", "categorical"), FeatureSpec("price", "numeric"))


def test_availability_matrix(schema: Schema) -> None:
    assert schema.availability() == {
        "click": {"home": True, "search": True, "ad": True},
        "conversion": {"home": True, "search": True, "ad": True},
        "ad_click": {"home": False, "search": False, "ad": True},
    }


def test_availability_with_several_scenarios_per_task() -> None:
    s = Schema(FEATS, (TaskSpec("a", scenarios=("home", "ad")), TaskSpec("b")), SCEN)
    assert s.availability()["a"] == {"home": True, "search": False, "ad": True}
    assert all(s.availability()["b"].values())


def test_without_scenario_column_there_is_one_aggregate_scenario() -> None:
    s = Schema(FEATS, (TaskSpec("click"),))
    assert s.scenario_names == (ALL,)
    assert s.availability() == {"click": {ALL: True}}


def test_task_with_unknown_scenario_raises_and_names_it() -> None:
    with pytest.raises(ValueError, match=r"ad_click.*'moon'"):
        Schema(FEATS, (TaskSpec("ad_click", scenarios=("ad", "moon")),), SCEN)


def test_task_scenarios_without_scenario_column_raise() -> None:
    with pytest.raises(ValueError, match="unknown scenarios"):
        Schema(FEATS, (TaskSpec("ad_click", scenarios=("ad",)),))


def test_duplicate_feature_names_raise() -> None:
    feats = (FeatureSpec("x", "categorical"), FeatureSpec("x", "numeric"))
    with pytest.raises(ValueError, match="duplicate feature name 'x'"):
        Schema(feats, (TaskSpec("click"),))


def test_duplicate_task_names_raise() -> None:
    with pytest.raises(ValueError, match="duplicate task name 'click'"):
        Schema(FEATS, (TaskSpec("click"), TaskSpec("click", column="other")))


def test_no_tasks_raise() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        Schema(FEATS, ())


def test_given_unknown_task_raises() -> None:
    with pytest.raises(ValueError, match=r"conversion.*'klick'"):
        Schema(FEATS, (TaskSpec("click"), TaskSpec("conversion", given="klick")))


def test_given_non_binary_task_raises() -> None:
    tasks = (TaskSpec("dwell", type="regression"), TaskSpec("conversion", given="dwell"))
    with pytest.raises(ValueError, match="not a binary task"):
        Schema(FEATS, tasks)


def test_given_itself_raises() -> None:
    with pytest.raises(ValueError, match="itself"):
        Schema(FEATS, (TaskSpec("click", given="click"),))


def test_vocab_from_must_be_categorical() -> None:
    feats = (*FEATS, FeatureSpec("hist", "sequence", vocab_from="price"))
    with pytest.raises(ValueError, match=r"hist.*price"):
        Schema(feats, (TaskSpec("click"),))


def test_hashed_feature_needs_buckets() -> None:
    with pytest.raises(ValueError, match="buckets"):
        Schema((FeatureSpec("u", "categorical", vocab="hash", buckets=1),), (TaskSpec("click"),))


def test_only_tasks_keeps_inputs_and_given_when_both_kept(schema: Schema) -> None:
    sub = schema.only_tasks(("click", "conversion"))
    assert sub.task_names == ("click", "conversion")
    assert sub.task("conversion").given == "click"
    assert sub.features == schema.features
    assert sub.scenario == schema.scenario
    assert sub.group == schema.group


def test_only_tasks_drops_given_when_its_task_is_dropped(schema: Schema) -> None:
    sub = schema.only_tasks(("conversion",))
    assert sub.task_names == ("conversion",)
    assert sub.task("conversion").given is None
    # the original is untouched (frozen)
    assert schema.task("conversion").given == "click"


def test_only_tasks_keeps_schema_order_and_availability(schema: Schema) -> None:
    sub = schema.only_tasks(("ad_click", "click"))
    assert sub.task_names == ("click", "ad_click")
    assert sub.availability()["ad_click"] == schema.availability()["ad_click"]


def test_only_tasks_unknown_task_raises(schema: Schema) -> None:
    with pytest.raises(KeyError, match="nope"):
        schema.only_tasks(("click", "nope"))


def test_task_lookup(schema: Schema) -> None:
    assert schema.task("ad_click").scenarios == ("ad",)
    with pytest.raises(KeyError, match="unknown task 'x'"):
        schema.task("x")


def test_source_columns_are_ordered_and_deduplicated(schema: Schema) -> None:
    # user_id is both a feature and the group column: listed once
    assert schema.source_columns() == [
        "user_id",
        "item_id",
        "price",
        "hist",
        "scenario",
        "click",
        "conversion",
        "ad_click",
    ]


def test_column_overrides_name_as_source() -> None:
    s = Schema(
        (FeatureSpec("user", "categorical", column="uid"),),
        (TaskSpec("click", column="is_click", oracle_column="p_click"),),
    )
    assert s.source_columns() == ["uid", "is_click", "p_click"]
    assert s.of_kind("categorical")[0].source == "uid"


def test_ranking_task_needs_the_group_column_that_defines_its_lists() -> None:
    with pytest.raises(ValueError, match=r"ranking task 'rank' needs `group`"):
        Schema(FEATS, (TaskSpec("rank", type="ranking"),))
    s = Schema(FEATS, (TaskSpec("rank", type="ranking", k=5),), group="user_id")
    assert s.task("rank").k == 5


def test_new_task_types_build_a_schema() -> None:
    tasks = (
        TaskSpec("click"),
        TaskSpec("kind", type="multiclass", n_classes=4, scenarios=("search",)),
        TaskSpec("sales", type="quantile", quantiles=(0.1, 0.5, 0.9), required=False),
    )
    s = Schema(FEATS, tasks, SCEN)
    assert s.availability()["kind"] == {"home": False, "search": True, "ad": False}
    assert s.only_tasks(("sales",)).task("sales").quantiles == (0.1, 0.5, 0.9)


@pytest.mark.parametrize(
    "cond", [TaskSpec("kind", type="multiclass", n_classes=3), TaskSpec("rank", type="ranking")]
)
def test_given_a_task_that_is_not_binary_raises(cond: TaskSpec) -> None:
    tasks = (cond, TaskSpec("conversion", given=cond.name))
    with pytest.raises(ValueError, match="not a binary task"):
        Schema(FEATS, tasks, group="user_id")


# -- the opt-in `other` scenario ----------------------------------------------------------------

OTHER = ScenarioSpec("country", ("US", "FR", "DE"), other="rest")


def test_other_is_one_more_scenario_after_the_values() -> None:
    s = Schema(FEATS, (TaskSpec("click"), TaskSpec("promo", scenarios=("rest",))), OTHER)
    assert s.scenario_names == ("US", "FR", "DE", "rest")
    assert s.availability()["promo"] == {"US": False, "FR": False, "DE": False, "rest": True}
    assert ScenarioSpec("country", ("US",)).names == ("US",)  # without it: the values alone


@pytest.mark.parametrize("other", ["", "FR"])
def test_other_must_be_a_new_name(other: str) -> None:
    with pytest.raises(ValueError, match="other must be a new non-empty scenario name"):
        ScenarioSpec("country", ("US", "FR"), other=other)


def test_other_survives_the_saved_schema_round_trip() -> None:
    """A model directory stores its schema with ``to_dict`` and loads it with ``from_dict``;
    a schema saved before ``other`` existed (no key) loads without it."""
    from shopmtl.config import from_dict, to_dict

    s = Schema(FEATS, (TaskSpec("click"),), OTHER)
    saved = to_dict(s)
    assert saved["scenario"] == {"column": "country", "values": ["US", "FR", "DE"],
                                 "other": "rest"}
    assert from_dict(Schema, saved) == s
    del saved["scenario"]["other"]
    assert from_dict(Schema, saved).scenario_names == ("US", "FR", "DE")


def _read(tmp_path: Path, spec: ScenarioSpec, countries: list[str]):
    """The rows of a CSV with these countries (one per row) read as training reads them:
    (scenario ids of the kept rows, (line, column, reason) of the bad ones)."""
    import numpy as np

    from shopmtl.data.ingest import BadRowLog, read_chunks

    path = tmp_path / "rows.csv"
    path.write_text("user_id,country,click\n" + "".join(f"u{i},{c},1\n"
                                                         for i, c in enumerate(countries)))
    schema = Schema((FeatureSpec("user_id", "categorical"),), (TaskSpec("click"),), spec)
    log = BadRowLog("quarantine", 1.0)
    parts = list(read_chunks(path, schema, 100, log))
    return (np.concatenate([p.scenario for p in parts]).tolist(),
            [(b.line, b.column, b.reason) for b in log.rows])


def test_reading_maps_every_unlisted_value_to_other(tmp_path: Path) -> None:
    scenario, bad = _read(tmp_path, OTHER, ["US", "JP", "DE", "", "FR"])
    assert bad == [] and scenario == [0, 3, 2, 3, 1]


def test_reading_without_other_still_sets_an_unknown_scenario_aside(tmp_path: Path) -> None:
    scenario, bad = _read(tmp_path, ScenarioSpec("country", ("US", "FR", "DE")),
                          ["US", "JP", "DE"])
    assert bad == [(3, "country", "unknown scenario")] and scenario == [0, 2]
