"""The private TRL methods our trainers override still have the signatures our overrides are written for.

TRL calls these methods itself, so when a release renames one or changes its parameters, our override is either
skipped without a word or called with arguments it does not take. pyproject.toml pins trl to the release range
they are tested with; this test says which method moved when that range is widened.
"""

import inspect

import pytest
import trl
from trl import DPOTrainer, RewardTrainer

from align.dpo_trainer import PairDPOTrainer
from reward.trainer import PreferenceRewardTrainer

# (TRL's class, our subclass, a private method of TRL's class that ours overrides)
OVERRIDES = [
    (DPOTrainer, PairDPOTrainer, "_prepare_dataset"),
    (DPOTrainer, PairDPOTrainer, "_set_signature_columns_if_needed"),
    (RewardTrainer, PreferenceRewardTrainer, "_set_signature_columns_if_needed"),
]


def parameters(method) -> list[tuple[str, object]]:
    return [(parameter.name, parameter.kind) for parameter in inspect.signature(method).parameters.values()]


@pytest.mark.parametrize(("theirs", "ours", "name"), OVERRIDES, ids=lambda value: getattr(value, "__name__", value))
def test_trl_private_methods_we_override_keep_their_signature(theirs, ours, name):
    where = f"trl {trl.__version__}: {theirs.__name__}.{name}"
    assert name in vars(ours), f"{ours.__name__} no longer overrides {name}: take it off this test's list"
    original = getattr(theirs, name, None)
    assert callable(original), f"{where} is gone, and {ours.__name__} overrides it: see what replaced it"
    assert parameters(original) == parameters(vars(ours)[name]), (
        f"{where} now takes ({', '.join(inspect.signature(original).parameters)}), while {ours.__name__}.{name} "
        f"is written for ({', '.join(inspect.signature(vars(ours)[name]).parameters)}): check how TRL calls it "
        "now and update the override"
    )


def test_every_private_trl_method_our_trainers_define_is_checked():
    """A new override of a private TRL method joins the list above, or this fails."""
    checked = {(ours, name) for _, ours, name in OVERRIDES}
    for theirs, ours in ((DPOTrainer, PairDPOTrainer), (RewardTrainer, PreferenceRewardTrainer)):
        for name in vars(ours):
            if name.startswith("_") and not name.startswith("__") and hasattr(theirs, name):
                assert (ours, name) in checked, f"{ours.__name__}.{name} overrides a private TRL method: list it"
