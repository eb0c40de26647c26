"""The pipeline's expand step on a tiny model: unreviewed, the seeds and every kept row train the SFT adapter;
reviewed, the step waits for people (a clear error), and a rerun after their decisions reuses the expansion and
trains on the seeds plus the rows they kept."""

import pytest
import yaml
from test_pipeline import pipeline_recipe  # noqa: F401 (a fixture)

from align.errors import AlignError
from align.expansion import origin_of
from align.pipeline import main
from align.registry import Registry
from align.review import ReviewStore

EXPAND = {"method": "self-instruct", "n": 2, "k": 2, "machine_k": 1, "round_size": 4, "min_words": 1,
          "max_rounds": 8, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 4}  # fmt: skip


def with_expand(path, **block):
    recipe = yaml.safe_load(path.read_text())
    recipe |= {"steps": ["import", "expand", "sft"], "expand": EXPAND | block}
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_unreviewed_expansion_trains_sft_on_the_seeds_and_the_new_rows(tmp_path, pipeline_recipe):  # noqa: F811
    outputs = main(with_expand(pipeline_recipe, review=False), workspace=str(tmp_path / "ws"))
    registry = Registry(tmp_path / "ws")
    assert outputs["expanded"] == "pipeline-expanded@1" and outputs["sft_data"] == "pipeline-sft-expanded@1"
    rows = registry.rows(outputs["sft_data"])
    assert len(rows) == 8 + 2 and sum(origin_of(row) is not None for row in rows) == 2  # 8 train seeds, 2 new
    [sft_run] = [run for run in registry.list_runs() if run.stage == "sft"]
    assert "pipeline-sft-expanded@1" in sft_run.inputs


def test_reviewed_expansion_waits_for_people_then_keeps_what_they_kept(tmp_path, pipeline_recipe, capsys):  # noqa: F811
    recipe = with_expand(pipeline_recipe)  # review: true by default
    workspace = str(tmp_path / "ws")
    with pytest.raises(AlignError, match=r"no reviews of pipeline-expanded@1 yet: review its rows with `align review"):
        main(recipe, workspace=workspace)
    registry = Registry(workspace)
    store = ReviewStore(registry, "pipeline-expanded")
    first = store.current("local")
    store.decide("local", first.lease, "accept")
    second = store.current("local")
    store.decide("local", second.lease, "reject", reason="noise")

    capsys.readouterr()
    outputs = main(recipe, workspace=workspace)
    out = capsys.readouterr().out
    assert "[expand] reused pipeline-expanded@1" in out  # the expansion is not made again
    rows = registry.rows(outputs["sft_data"])
    assert outputs["sft_data"] == "pipeline-sft-reviewed@1" and len(rows) == 8 + 1
    assert origin_of(rows[-1])["review"]["decision"] == "accept"
    assert "adapter:sft@1" == outputs["sft"]


def test_a_bad_expand_setting_fails_before_any_step(tmp_path, pipeline_recipe):  # noqa: F811
    with pytest.raises(AlignError, match="config key 'expand': unknown operator 'shorten'"):
        main(with_expand(pipeline_recipe, method="evol", operators=["deepen", "shorten"]), workspace=str(tmp_path))
    with pytest.raises(AlignError, match="config key 'expand.sampler' is not a setting"):
        main(with_expand(pipeline_recipe, sampler=1), workspace=str(tmp_path))
