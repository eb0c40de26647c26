"""The DPO loss on fixed log-probs, every number worked out by hand; the agreement -> smoothing map; the configs.

One pair throughout, beta = 0.5:
    policy log-probs  chosen -10, rejected -12;   reference log-probs  chosen -11, rejected -11
    log-ratios        chosen +1,  rejected -1;    gap 2, so z = beta * gap = 1
Useful values: -log s(1) = log(1 + e^-1) = 0.3132617,  -log s(-1) = log(1 + e) = 1.3132617,
               -log s(0.5) = log(1 + e^-0.5) = 0.4740770.
"""

import math

import pytest
import torch

import align.dpo_trainer as dpo_trainer
from align.config import build_config
from align.dpo import DPOStageConfig
from align.dpo_trainer import AUTO_SMOOTHING_CAP, cpu_threads, dpo_loss, smoothing_from_agreement
from align.errors import AlignError

SOFTPLUS_MINUS_1 = 0.3132617  # -log sigmoid(1)
SOFTPLUS_1 = 1.3132617  # -log sigmoid(-1)


def one_pair(**kwargs):
    t = torch.tensor
    loss, losses = dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=0.5, **kwargs)
    assert loss.item() == pytest.approx(losses.item(), abs=1e-7)  # one pair, weight 1: the mean is the pair
    return loss.item()


def test_sigmoid_is_minus_log_sigmoid_of_beta_times_the_gap():
    assert one_pair(loss_type="sigmoid") == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-6)


def test_sigmoid_with_label_smoothing_is_conservative_dpo():
    # 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.2819355 + 0.1313262
    assert one_pair(loss_type="sigmoid", label_smoothing=0.1) == pytest.approx(0.4132617, abs=1e-6)


def test_robust_with_label_smoothing():
    # (0.9 * 0.3132617 - 0.1 * 1.3132617) / (1 - 0.2) = (0.2819355 - 0.1313262) / 0.8 = 0.1506094 / 0.8
    assert one_pair(loss_type="robust", label_smoothing=0.1) == pytest.approx(0.1882617, abs=1e-6)
    # without smoothing robust is plain DPO
    assert one_pair(loss_type="robust") == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-6)


def test_ipo_uses_the_per_token_gap():
    # chosen 4 tokens, rejected 2: gap per token = 1/4 - (-1/2) = 0.75; target 1/(2 beta) = 1; (0.75 - 1)^2
    lengths = {"chosen_lengths": torch.tensor([4.0]), "rejected_lengths": torch.tensor([2.0])}
    assert one_pair(loss_type="ipo", **lengths) == pytest.approx(0.0625, abs=1e-7)
    # margin 0.5 moves the target to (1/2 + 0.5) / beta = 2: (0.75 - 2)^2
    assert one_pair(loss_type="ipo", margins=torch.tensor([0.5]), **lengths) == pytest.approx(1.5625, abs=1e-6)
    # a tie pulls the gap to 0: 0.75^2
    assert one_pair(loss_type="ipo", ties=torch.tensor([True]), **lengths) == pytest.approx(0.5625, abs=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        one_pair(loss_type="ipo")


def test_margin_is_an_offset_in_reward_units():
    # z = 1 - 0.5 = 0.5
    assert one_pair(loss_type="sigmoid", margins=torch.tensor([0.5])) == pytest.approx(0.4740770, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_a_tie_is_a_fifty_fifty_label(loss_type):
    # (0.3132617 + 1.3132617) / 2, whatever the smoothing and margin
    tie = {"ties": torch.tensor([True]), "margins": torch.tensor([3.0]), "label_smoothing": 0.2}
    assert one_pair(loss_type=loss_type, **tie) == pytest.approx(0.8132617, abs=1e-6)
    # ... and it is smallest, with zero gradient, when the two rewards are equal
    gap = torch.zeros(1, requires_grad=True)
    zero = torch.zeros(1)
    loss, _ = dpo_loss(gap, zero, zero, zero, loss_type=loss_type, beta=0.5, ties=torch.tensor([True]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and gap.grad.abs().item() < 1e-7


def test_weights_scale_each_pair_and_the_mean_is_over_pairs():
    t = torch.tensor
    # pair 1 as above (0.3132617), pair 2 a tie (0.8132617); weights 2 and 0: (2 * 0.3132617 + 0) / 2
    loss, losses = dpo_loss(
        t([-10.0, -10.0]),
        t([-12.0, -12.0]),
        t([-11.0, -11.0]),
        t([-11.0, -11.0]),
        beta=0.5,
        ties=t([False, True]),
        weights=t([2.0, 0.0]),
    )
    assert losses.tolist() == pytest.approx([SOFTPLUS_MINUS_1, 0.8132617], abs=1e-6)
    assert loss.item() == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-6)


def test_a_pair_the_policy_ranks_wrong_costs_more():
    t = torch.tensor
    right = dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=0.5)[0]
    wrong = dpo_loss(t([-12.0]), t([-10.0]), t([-11.0]), t([-11.0]), beta=0.5)[0]
    assert wrong.item() == pytest.approx(SOFTPLUS_1, abs=1e-6) and wrong > right


def test_smoothing_from_agreement():
    # two votes agree with probability (1-e)^2 + e^2 = p  =>  e = (1 - sqrt(2p - 1)) / 2
    assert smoothing_from_agreement(1.0) == 0.0
    assert smoothing_from_agreement(0.8) == pytest.approx((1 - math.sqrt(0.6)) / 2)  # 0.1127017
    assert smoothing_from_agreement(0.9) == pytest.approx(0.0527864, abs=1e-7)
    e = smoothing_from_agreement(0.8)
    assert (1 - e) ** 2 + e**2 == pytest.approx(0.8)
    assert smoothing_from_agreement(0.5) == AUTO_SMOOTHING_CAP  # no signal: capped below rDPO's pole at 0.5
    assert smoothing_from_agreement(0.3) == AUTO_SMOOTHING_CAP


def config(**values):
    return build_config(DPOStageConfig, {"dataset": "prefs", "report_to": "none"} | values, source="r.yaml")


def test_config_accepts_the_three_losses_and_auto_smoothing():
    assert config(loss_type="robust", label_smoothing="auto").label_smoothing == "auto"
    assert config(loss_type="ipo").loss_type == ["ipo"]
    assert config(label_smoothing="0.1").label_smoothing == 0.1
    assert config().model == "adapter:sft"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"loss_type": "hinge"}, "'loss_type' must be one of sigmoid, robust, ipo"),
        ({"label_smoothing": 0.5}, r"'label_smoothing' must be in \[0, 0.5\)"),
        ({"label_smoothing": "sometimes"}, "'label_smoothing' must be a number in"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "not to ipo"),
        ({"peft": "ia3"}, "'peft': DPO trains a LoRA adapter"),
        ({"use_weighting": True}, "'use_weighting' is not supported"),
        ({"max_length": 10}, "'max_length' must exceed"),
        ({"eval_limit": 0}, "'eval_limit' must be at least 1"),
        ({"torch_threads": "many"}, "'torch_threads' must be a number, auto or null"),
        ({"torch_threads": 0}, "'torch_threads' must be at least 1"),
    ],
)
def test_bad_config_values_name_the_key(values, message):
    with pytest.raises(AlignError, match=message):
        config(**values)


def test_torch_threads_auto_uses_the_idle_cores(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for idle, threads in ((1.0, 2), (0.8, 2), (0.7, 1), (0.5, 1), (0.0, 1)):
        monkeypatch.setattr(dpo_trainer, "idle_fraction", lambda idle=idle: idle)
        assert cpu_threads("auto") == threads, idle
    monkeypatch.setattr(dpo_trainer, "idle_fraction", lambda: None)  # cannot tell: torch's default
    assert cpu_threads("auto") is None
    assert cpu_threads(3) == 3 and cpu_threads(None) is None
    assert config(torch_threads="AUTO").torch_threads == "auto" and config(torch_threads="2").torch_threads == 2


def test_idle_fraction_reads_the_cores():
    idle = dpo_trainer.idle_fraction(0.1)
    assert idle is None or 0.0 <= idle <= 1.0
