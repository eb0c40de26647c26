"""Multi-objective reward models: one shared backbone, the pairwise preference head, and one head per attribute.

    align rm --config recipes/rm/smollm2-135m-lora.yaml --objectives helpfulness,harmlessness
    align ppo --config recipes/ppo/smollm2-135m-grpo.yaml --reward_model rm:rm \
        --reward_weights helpfulness=1.0,harmlessness=2.0

Heads. The score head of the sequence classifier has 1 + A outputs, read from the same pooled state: output 0 is
the preference head ("preference", trained as a one-head reward model is: Bradley-Terry on the pairs), output 1 + i
the head of the i-th attribute of `objectives`. Each output is one linear map of the shared backbone's state, so
the heads share every layer below and cost one forward pass together.

Attribute heads learn the rubric scores people gave (`align label --rubric`, averaged per reply by `align data
from-labels` into each preference row's `scores` field: {attribute: {"chosen": x, "rejected": y}}). The loss is
a regression: the mean squared error between the head's output and the score mapped from 1-5 to [-1, 1],
(score - 3) / 2, over the replies that carry that attribute's score. A regression rather than a pairwise loss on
the two replies' scores, because
  - a rubric score is an absolute level, not only an order: two replies both scored 5 teach a pairwise loss
    nothing, and a regression that both are good;
  - a reply scored alone (its pair's other reply unscored) still trains the head;
  - the output keeps a fixed meaning, the expected score, so `reward_weights` add quantities on a known scale;
    a pairwise head is defined only up to a shift and a scale of its own.
A reply without an attribute's score contributes nothing to that head (masked); the preference head trains on
every pair as before. Each head's loss is the mean over its scored replies in the batch; the attribute loss is the
mean over the heads that have any, added to the preference loss.

Rewards from several heads. `reward_weights: {helpfulness: 1.0, harmlessness: 2.0}` makes the reward the weighted
sum of the heads named, each head's output as it is (an attribute head's on the [-1, 1] scale above, the
preference head's the Bradley-Terry score). A head not named gets weight 0: the preference head is included only
when named, `{preference: 1.0, harmlessness: 0.5}`. Without `reward_weights` the reward is the preference head's
score alone, as with a one-head reward model.

This module knows nothing of the registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from align.errors import AlignError
from align.registry.schemas import RUBRIC_SCALE, read_scores

PREFERENCE = "preference"  # the name of the pairwise head, output 0
RUBRIC_MIDDLE = (RUBRIC_SCALE[0] + RUBRIC_SCALE[1]) / 2  # 3: maps to 0
RUBRIC_HALF_RANGE = (RUBRIC_SCALE[1] - RUBRIC_SCALE[0]) / 2  # 2: 1 and 5 map to -1 and 1


def check_objectives(value: Sequence[str] | str | None, key: str = "objectives") -> list[str]:
    """`helpfulness,harmlessness` (or a list) -> ["helpfulness", "harmlessness"]; refused naming the key: a name
    that is not a plain word, a name given twice, or `preference` (the pairwise head's own name)."""
    if value is None:
        return []
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise ValueError(f"config key '{key}' must be a list of attribute names or a,b,c (got {value!r})")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"config key '{key}' takes attribute names like helpfulness,harmlessness (got {name!r})")
        if name == PREFERENCE:
            raise ValueError(f"config key '{key}': '{PREFERENCE}' is the pairwise head's own name, not an attribute")
    if len(set(names)) != len(names):
        raise ValueError(f"config key '{key}' names an attribute twice (got {','.join(names)})")
    return list(names)


def head_names(objectives: Sequence[str] | None) -> tuple[str, ...]:
    """The heads of a reward model in output order: the preference head, then one per attribute."""
    return (PREFERENCE, *(objectives or ()))


def scaled(score: float) -> float:
    """A rubric score (1-5) on the attribute heads' scale, [-1, 1]."""
    return (score - RUBRIC_MIDDLE) / RUBRIC_HALF_RANGE


def unscaled(value: float) -> float:
    """An attribute head's output back on the rubric's 1-5 scale."""
    return RUBRIC_MIDDLE + RUBRIC_HALF_RANGE * value


def attribute_targets(row: dict, objectives: Sequence[str]) -> tuple[list[list[float]], list[list[float]]]:
    """(targets, mask), each [2][A]: the chosen then the rejected reply's scaled score per attribute, and 1 where
    the row carries that score (0, target 0, where it does not)."""
    scores = read_scores(row)
    targets = [[0.0] * len(objectives), [0.0] * len(objectives)]
    mask = [[0.0] * len(objectives), [0.0] * len(objectives)]
    for index, attribute in enumerate(objectives):
        for side, name in enumerate(("chosen", "rejected")):
            value = scores.get(attribute, {}).get(name)
            if value is not None:
                targets[side][index], mask[side][index] = scaled(float(value)), 1.0
    return targets, mask


def scored_pairs(rows: Sequence[dict], attribute: str) -> list[int]:
    """The rows whose two replies both carry `attribute`'s score, and different ones: the pairs its head can be
    right or wrong about."""
    found = []
    for index, row in enumerate(rows):
        sides = read_scores(row).get(attribute, {})
        if sides.get("chosen") is not None and sides.get("rejected") is not None:
            if sides["chosen"] != sides["rejected"]:
                found.append(index)
    return found


def parse_reward_weights(value: Mapping | str | None, key: str = "reward_weights") -> dict[str, float] | None:
    """`reward_weights` as a mapping of head name -> finite number: from YAML a mapping, on the command line
    `helpfulness=1,harmlessness=2` or `{helpfulness: 1, harmlessness: 2}`. Refused naming the key and the value."""
    if value is None:
        return None
    wanted = f"config key '{key}' must map head names to numbers, like {{helpfulness: 1.0, harmlessness: 2.0}}"
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ValueError(f"{wanted} (got {text!r})") from None
        else:
            pairs = [part.partition("=") for part in text.split(",") if part.strip()]
            if not pairs or any(not equals for _, equals, _ in pairs):
                raise ValueError(f"{wanted} or helpfulness=1,harmlessness=2 (got {text!r})")
            value = {}
            for name, _, number in pairs:
                try:
                    value[name.strip()] = float(number)
                except ValueError:
                    raise ValueError(
                        f"config key '{key}': the weight of {name.strip()!r} must be a number (got {number.strip()!r})"
                    ) from None
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{wanted} (got {value!r})")
    weights = {}
    for name, weight in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"config key '{key}' names a head that is not a plain name ({name!r})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"config key '{key}': the weight of {name!r} must be a finite number (got {weight!r})")
        weights[name] = float(weight)
    if not any(weights.values()):
        raise ValueError(f"config key '{key}': every weight is 0, which makes a constant reward (got {weights})")
    return weights


def check_reward_weights(weights: Mapping[str, float], heads: Sequence[str], model: str) -> None:
    """Every head `weights` names is one of the reward model's `heads`; else an AlignError naming it and its weight."""
    for name, weight in weights.items():
        if name not in heads:
            what = "only the preference head" if len(heads) == 1 else f"the heads {', '.join(heads)}"
            raise AlignError(
                f"config key 'reward_weights': {name!r} (weight {weight:g}) is not a head of {model}, which has "
                f"{what}" + (" (train one with --objectives)" if len(heads) == 1 else "")
            )


def weighted_sum(scores: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """Per item, sum over the weighted heads of weight x that head's score. `scores`: head -> one score per item."""
    missing = [name for name in weights if name not in scores]
    if missing:
        raise AlignError(f"reward_weights names {', '.join(missing)}, which the reward model has no head for")
    count = len(next(iter(scores.values())))
    return [sum(weight * scores[name][i] for name, weight in weights.items()) for i in range(count)]
