"""Before a resume changes anything, saved optimizer and scheduler values must have the kinds of the live ones (a
number stays a number, a flag a flag, text text) and saved optimizer state must fit its parameter's shape: the rules
``resumer.runtime.preflight`` applies, on plain values."""

from __future__ import annotations

import pytest
import torch

from resumer.runtime.preflight import _fits, _short, compatible

COMPATIBLE = [
    (0.5, None), (None, None), (True, None),            # None is a flag: a number or a flag may replace it
    (None, True), (False, True),                        # a flag takes a flag or None
    (3, 0.1), (0.1, 3), (torch.tensor(0.5), 0.1),       # numbers are interchangeable, a one-element tensor too
    (torch.zeros(3), torch.ones(3)), (0.5, torch.tensor(1.0)),
    (("adam", 0.9), ("sgd", 0.5)), ([0.9, 0.999], (0.8, 0.99)),  # sequences: same length, element by element
    ({"lr": 0.1, "gone": "x"}, {"lr": 0.2}),            # dicts: the keys both have
    ("cosine", "linear"),
]
INCOMPATIBLE = [
    (1, True), (0.5, True), ("x", None), ("x", True),
    (True, 0.1), ("0.1", 0.1),
    ("x", torch.zeros(3)), (torch.zeros(2), torch.zeros(3)), (True, torch.tensor(1.0)), (0.5, torch.zeros(3)),
    ((0.9,), (0.9, 0.999)), (("adam", "x"), ("adam", 0.5)), (0.9, (0.9,)),
    ({"lr": "x"}, {"lr": 0.1}), ([0.1], {"lr": 0.1}),
    (1, "linear"),
]


@pytest.mark.parametrize(("saved", "live"), COMPATIBLE)
def test_a_saved_value_of_the_live_values_kind_is_compatible(saved, live):
    assert compatible(saved, live) is True


@pytest.mark.parametrize(("saved", "live"), INCOMPATIBLE)
def test_a_saved_value_of_another_kind_is_not(saved, live):
    assert not compatible(saved, live)


@pytest.mark.parametrize(("state", "param", "fits"), [
    ((4, 3), (4, 3), True), ((), (4, 3), True), ((1,), (4, 3), True),   # same shape, a step count
    ((4, 1), (4, 3), True), ((1, 3), (4, 3), True),                      # factored second moments
    ((4, 5), (4, 3), False), ((3, 4), (4, 3), False), ((12,), (4, 3), False), ((4, 3, 1), (4, 3), False),
])
def test_optimizer_state_fits_a_parameter_of_its_shape_or_that_shape_reduced_to_1(state, param, fits):
    assert _fits(state, param) is fits


def test_a_long_value_is_shortened_in_a_refusal():
    assert _short("x" * 10) == "'xxxxxxxxxx'"
    long = _short("y" * 200)
    assert len(long) == 80 and long == ("'" + "y" * 200)[:77] + "..."
