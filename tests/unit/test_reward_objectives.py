"""Multi-objective reward models, the parts that need no model: the rubric scores a preference row carries and how
`data from-labels` puts them there, the attribute heads' targets and loss, each head's accuracy, `reward_weights`
and their weighted sum, and the per-attribute numbers of `align eval`. Numbers checked by hand."""

import json
import math

import pytest
import torch

from align.config import build_config
from align.errors import AlignError
from align.eval_metrics import attribute_entries
from align.labels import aggregate, completion_scores, from_labels, rubric_scores
from align.registry import Registry
from align.registry.labels import Vote
from align.registry.schemas import RowError, read_scores, validate_row
from reward.loss import attribute_loss
from reward.metrics import head_lines, head_metrics, heads_markdown
from reward.model import PairScores
from reward.objectives import (
    attribute_targets,
    check_objectives,
    check_reward_weights,
    parse_reward_weights,
    scaled,
    scored_pairs,
    unscaled,
    weighted_sum,
)
from reward.train import RewardStageConfig


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def pair(scores=None, tie=False) -> dict:
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": reply("a"), "rejected": reply("b")}
    if scores is not None:
        row["scores"] = scores
    if tie:
        row["tie"] = True
    return row


# The row field


def test_a_preference_row_carries_rubric_scores_as_canonical_json():
    row = validate_row(
        "preference", pair({"harmlessness": {"chosen": 4}, "helpfulness": {"rejected": 2, "chosen": 4.5}})
    )
    assert row["scores"] == '{"harmlessness": {"chosen": 4.0}, "helpfulness": {"chosen": 4.5, "rejected": 2.0}}'
    assert validate_row("preference", pair(row["scores"]))["scores"] == row["scores"]  # stored rows pass again
    assert read_scores(row) == {"harmlessness": {"chosen": 4.0}, "helpfulness": {"chosen": 4.5, "rejected": 2.0}}
    assert read_scores(pair()) == {}
    for bad, where in (
        ({"helpfulness": {"chosen": 6}}, "scores.helpfulness.chosen"),
        ({"helpfulness": {"better": 3}}, "scores.helpfulness"),
        ({"helpfulness": {}}, "scores.helpfulness"),
        ({"help fulness": {"chosen": 3}}, "scores"),
        ([1, 2], "scores"),
        ("not json", "scores"),
    ):
        with pytest.raises(RowError) as caught:
            validate_row("preference", pair(bad))
        assert caught.value.field == where, bad


def test_an_imported_file_keeps_the_scores(tmp_path):
    registry = Registry(tmp_path / "ws")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair({"helpfulness": {"chosen": 5, "rejected": 1}})) + "\n")
    version, _ = registry.import_file(path, name="scored", kind="preference")
    assert read_scores(registry.rows(version)[0]) == {"helpfulness": {"chosen": 5.0, "rejected": 1.0}}
    registry.close()


# From votes to rows


def cands() -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"q{r}"}], "completions": [reply(f"{r}.0"), reply(f"{r}.1")],
         "sources": ["x", "y"]}
        for r in range(2)
    ]  # fmt: skip


VOTES = [
    # row 0, completion 0 shown as A: alice and bob both prefer completion 0
    Vote(1, 0, "alice", "pairwise", (0, 1), "A", scores={"helpfulness:A": 5, "helpfulness:B": 2, "harmlessness:A": 4}),
    Vote(2, 0, "bob", "pairwise", (1, 0), "B", scores={"helpfulness:A": 3, "helpfulness:B": 4}),
    Vote(3, 1, "alice", "pairwise", (1, 0), "A"),  # row 1: completion 1 wins, nobody scored it
]


def test_each_pair_carries_its_replies_mean_scores_by_hand():
    means = completion_scores(rubric_scores(cands(), VOTES))
    # completion 0: helpfulness 5 (alice, A) and 4 (bob, B) -> 4.5, harmlessness 4; completion 1: 2 and 3 -> 2.5
    assert means == {(0, 0): {"helpfulness": 4.5, "harmlessness": 4.0}, (0, 1): {"helpfulness": 2.5}}
    rows = aggregate(cands(), VOTES, scores=means).rows
    assert rows[0]["scores"] == {"harmlessness": {"chosen": 4.0}, "helpfulness": {"chosen": 4.5, "rejected": 2.5}}
    assert rows[0]["chosen"] == reply("0.0") and "scores" not in rows[1]
    assert "scores" not in aggregate(cands(), VOTES).rows[0]  # without scores, the rows are as before


def test_from_labels_writes_them_into_the_rows(tmp_path, capsys):
    from align import cli
    from align.labels import LabelStore

    registry = Registry(tmp_path / "ws")
    registry.register(cands(), name="cands", kind="candidates")
    store = LabelStore(registry, "cands", overlap=1, seed=0, rubric="helpfulness")
    for _ in range(2):
        held = store.current("local")
        store.vote("local", held.lease, "A", scores={"helpfulness:A": 4, "helpfulness:B": 1})
    version, _, _ = from_labels(registry, "cands", name="prefs")
    expected = {"helpfulness": {"chosen": 4.0, "rejected": 1.0}}
    assert [read_scores(row) for row in registry.rows(version)] == [expected] * 2
    assert cli.main(["--workspace", str(registry.root), "data", "from-labels", "cands", "--name", "again"]) == 0
    assert "2 of 2 pairs carry rubric scores (what `align rm --objectives` trains on)" in capsys.readouterr().out
    registry.close()


# Heads: targets, loss, accuracy


def test_objectives_are_plain_distinct_names_and_not_the_preference_head():
    assert check_objectives("helpfulness, harmlessness") == ["helpfulness", "harmlessness"]
    assert check_objectives(None) == [] and check_objectives(["a"]) == ["a"]
    for bad, message in (("a,a", "twice"), ("preference", "pairwise head's own name"), ("a b", "attribute names")):
        with pytest.raises(ValueError, match=message):
            check_objectives(bad)
    config = build_config(RewardStageConfig, {"dataset": "d", "objectives": "helpfulness,harmlessness"})
    assert config.objectives == ["helpfulness", "harmlessness"]
    with pytest.raises(AlignError, match="config key 'objectives' names an attribute twice"):
        build_config(RewardStageConfig, {"dataset": "d", "objectives": ["a", "a"]})


def test_targets_are_scores_on_the_heads_scale_and_missing_ones_are_masked():
    assert (scaled(1), scaled(3), scaled(5), scaled(4.5)) == (-1.0, 0.0, 1.0, 0.75)
    assert unscaled(0.75) == 4.5
    row = pair({"helpfulness": {"chosen": 5, "rejected": 2}, "harmlessness": {"chosen": 3}})
    targets, mask = attribute_targets(row, ["helpfulness", "harmlessness", "honesty"])
    assert targets == [[1.0, 0.0, 0.0], [-0.5, 0.0, 0.0]]
    assert mask == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_attribute_loss_by_hand():
    # one pair, two heads: [pair][chosen, rejected][head]
    predicted = torch.tensor([[[0.5, 0.0], [0.0, 9.0]]])
    target = torch.tensor([[[1.0, 0.0], [-0.5, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    # head 0: ((0.5 - 1)^2 + (0 + 0.5)^2) / 2 = 0.25; head 1: (0 - 0)^2 / 1 = 0 (the unscored 9.0 counts for nothing)
    assert attribute_loss(predicted, target, mask).item() == pytest.approx(0.125)
    only_first = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # head 1 has no score in the batch: left out of the mean
    assert attribute_loss(predicted, target, only_first).item() == pytest.approx(0.25)
    nothing = attribute_loss(predicted.requires_grad_(), target, torch.zeros_like(mask))
    assert nothing.item() == 0 and nothing.requires_grad


def test_each_heads_accuracy_on_each_kind_of_label_by_hand():
    rows = [
        pair({"helpfulness": {"chosen": 5, "rejected": 1}, "harmlessness": {"chosen": 2, "rejected": 4}}),
        pair({"helpfulness": {"chosen": 2, "rejected": 4}}),
        pair({"helpfulness": {"chosen": 3, "rejected": 3}, "harmlessness": {"chosen": 5}}),  # equal; one side
        pair(),
    ]
    assert scored_pairs(rows, "helpfulness") == [0, 1] and scored_pairs(rows, "harmlessness") == [0]
    scores = PairScores(
        chosen=[1.0, 0.5, 0.0, 2.0],
        rejected=[0.0, 1.0, 0.0, 1.0],
        chosen_lengths=[1] * 4,
        rejected_lengths=[1] * 4,
        tie=[False] * 4,
        stats=None,
        attributes={
            "helpfulness": ([1.0, -0.5, 0.0, 0.0], [-1.0, 0.5, 0.0, 0.0]),
            "harmlessness": ([0.0] * 4, [0.5] * 4),
        },
    )
    found = head_metrics(rows, scores, ["helpfulness", "harmlessness"])
    helpfulness = found["heads"]["attributes"]["helpfulness"]
    assert helpfulness["pairs"] == 2
    assert helpfulness["accuracy"]["helpfulness"]["value"] == 1.0  # row 0: 1 > -1 right; row 1: -0.5 < 0.5 right
    assert helpfulness["accuracy"]["preference"]["value"] == 1.0  # row 0: 1 > 0 right; row 1: 0.5 < 1 right
    # the harmlessness head scores every rejected reply higher (0 < 0.5): wrong on row 0, right on row 1
    assert helpfulness["accuracy"]["harmlessness"]["value"] == 0.5
    harmlessness = found["heads"]["attributes"]["harmlessness"]
    assert harmlessness["pairs"] == 1 and harmlessness["accuracy"]["harmlessness"]["value"] == 1.0  # 2 < 4, 0 < 0.5
    low, high = harmlessness["accuracy"]["harmlessness"]["low"], harmlessness["accuracy"]["harmlessness"]["high"]
    assert 0 < low < 1 == high
    # mean absolute error on the 1-5 scale: helpfulness replies 5,1,2,4,3,3 against 5,1,2,4,3,3 predicted -> 0
    assert helpfulness["mae"] == 0.0 and helpfulness["replies"] == 6
    # harmlessness: row 0 chosen 2 (predicted 3: error 1), rejected 4 (predicted 4: 0); row 2 chosen 5 (3: 2)
    assert harmlessness["mae"] == pytest.approx(1.0) and harmlessness["replies"] == 3
    assert found["accuracy_helpfulness"] == 1.0 and found["pairs_harmlessness"] == 1
    # on the preference labels (every row decided): the helpfulness head gets rows 0 and 2 (tie: 0.5) right
    assert found["heads"]["preference_labels"]["helpfulness"]["value"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    table = heads_markdown(found)
    assert "| helpfulness scores differ | 2 |" in table and "**1.000" in table
    assert head_lines(found)[0].startswith("helpfulness head: accuracy 1.000 [")


def test_no_scored_pairs_is_said_not_divided_by_zero():
    scores = PairScores([1.0], [0.0], [1], [1], [False], None, attributes={"helpfulness": ([0.0], [0.0])})
    found = head_metrics([pair()], scores, ["helpfulness"])
    assert found["pairs_helpfulness"] == 0 and math.isnan(found["accuracy_helpfulness"])
    assert head_lines(found) == ["helpfulness head: no pairs whose helpfulness scores differ (0 replies scored)"]


# Rewards from several heads


def test_reward_weights_parse_from_yaml_and_the_command_line():
    assert parse_reward_weights({"helpfulness": 1, "harmlessness": 2.0}) == {"helpfulness": 1.0, "harmlessness": 2.0}
    assert parse_reward_weights("helpfulness=1,harmlessness=2") == {"helpfulness": 1.0, "harmlessness": 2.0}
    assert parse_reward_weights("{preference: 1, harmlessness: -0.5}") == {"preference": 1.0, "harmlessness": -0.5}
    assert parse_reward_weights(None) is None
    for bad, message in (
        ("helpfulness=lots", "the weight of 'helpfulness' must be a number"),
        ({"helpfulness": "x"}, "the weight of 'helpfulness' must be a finite number"),
        ({"helpfulness": float("inf")}, "finite number"),
        ({"helpfulness": 0, "harmlessness": 0}, "every weight is 0"),
        ("helpfulness", "must map head names to numbers"),
        ({}, "must map head names to numbers"),
        ({"help fulness": 1}, "not a plain name"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_reward_weights(bad)


def test_a_head_the_reward_model_lacks_is_named_with_its_weight():
    heads = ("preference", "helpfulness", "harmlessness")
    check_reward_weights({"helpfulness": 1.0, "preference": 0.5}, heads, "rm:multi@1")
    with pytest.raises(AlignError) as caught:
        check_reward_weights({"helpfulness": 1.0, "honesty": 2.0}, heads, "rm:multi@1")
    assert str(caught.value) == (
        "config key 'reward_weights': 'honesty' (weight 2) is not a head of rm:multi@1, which has the heads "
        "preference, helpfulness, harmlessness"
    )
    with pytest.raises(AlignError, match="has only the preference head \\(train one with --objectives\\)"):
        check_reward_weights({"helpfulness": 1.0}, ("preference",), "rm:plain@1")


def test_the_weighted_sum_by_hand():
    scores = {"preference": [0.5, -1.0], "helpfulness": [0.2, 0.8], "harmlessness": [-0.5, 1.0]}
    # 1 x 0.2 + 2 x -0.5 = -0.8 and 1 x 0.8 + 2 x 1.0 = 2.8: the preference head is left out when not named
    assert weighted_sum(scores, {"helpfulness": 1.0, "harmlessness": 2.0}) == pytest.approx([-0.8, 2.8])
    # 1 x 0.5 + 0.5 x -0.5 = 0.25 and 1 x -1.0 + 0.5 x 1.0 = -0.5
    assert weighted_sum(scores, {"preference": 1.0, "harmlessness": 0.5}) == pytest.approx([0.25, -0.5])


# Evaluation per attribute


def test_attribute_scores_and_win_rates_by_hand():
    mine = {"helpfulness": [1.0, 0.0, -1.0, 0.5]}
    theirs = {"helpfulness": [0.0, 0.0, 0.0, 0.0]}
    found = attribute_entries(mine, theirs, rounds=50, seed=0)["helpfulness"]
    # on the 1-5 scale: 5, 3, 1, 4 -> mean 3.25; against the baseline: win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert found["score"]["value"] == pytest.approx(3.25)
    assert found["win_rate"]["value"] == pytest.approx(0.625)
    assert found["win_rate"]["low"] <= 0.625 <= found["win_rate"]["high"]
    assert "win_rate" not in attribute_entries(mine, None, rounds=50)["helpfulness"]  # the baseline row itself
