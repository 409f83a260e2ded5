"""Learning-rate schedules over global epochs."""

import math

import pytest

from auxpar.config import OptimConfig
from auxpar.lr_schedule import lr_at


def test_multistep_wrn_recipe():
    o = OptimConfig(lr=0.1, lr_schedule="multistep", milestones=[60, 120, 160], gamma=0.2)
    assert lr_at(o, 0, 200) == pytest.approx(0.1)
    assert lr_at(o, 59.99, 200) == pytest.approx(0.1)
    assert lr_at(o, 60, 200) == pytest.approx(0.02)
    assert lr_at(o, 130.5, 200) == pytest.approx(0.004)
    assert lr_at(o, 199.9, 200) == pytest.approx(0.1 * 0.2 ** 3)


def test_cosine_and_step_and_constant():
    o = OptimConfig(lr=0.05, lr_schedule="cosine", min_lr=0.001)
    assert lr_at(o, 0, 10) == pytest.approx(0.05)
    assert lr_at(o, 5, 10) == pytest.approx(0.001 + 0.049 * 0.5)
    assert lr_at(o, 10, 10) == pytest.approx(0.001)
    s = OptimConfig(lr=1.0, lr_schedule="step", step_size=3, gamma=0.5)
    assert [lr_at(s, e, 10) for e in (0, 2.9, 3, 6)] == pytest.approx([1, 1, 0.5, 0.25])
    assert lr_at(OptimConfig(lr=0.3, lr_schedule="constant"), 7.7, 10) == pytest.approx(0.3)


def test_warmup_is_linear_from_a_tenth():
    o = OptimConfig(lr=1.0, lr_schedule="constant", warmup_epochs=2)
    assert lr_at(o, 0, 10) == pytest.approx(0.1)
    assert lr_at(o, 1, 10) == pytest.approx(0.55)
    assert lr_at(o, 2, 10) == pytest.approx(1.0)
    assert not math.isclose(lr_at(o, 0.5, 10), 1.0)
