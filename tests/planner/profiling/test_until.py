"""`--until`: the stop rule's text, and when it holds."""

from __future__ import annotations

import pytest

from planner.profiling.estimate import Accuracy
from planner.profiling.until import UntilError, parse_until


def test_targets_read_as_fractions_percent_or_not():
    rule = parse_until("median_ape<=8%, p90_ape <= 0.2")
    assert rule.targets == {"median_ape": 0.08, "p90_ape": 0.2}
    assert str(rule) == "median_ape<=8%,p90_ape<=20%"


def test_met_only_when_every_target_holds():
    rule = parse_until("median_ape<=8%,p90_ape<=20%")
    assert rule.met(Accuracy(20, 20, 0.07, 0.19, 0.8))
    assert not rule.met(Accuracy(20, 20, 0.07, 0.21, 0.8))
    assert not rule.met(Accuracy(20, 20, 0.09, 0.10, 0.8))


@pytest.mark.parametrize("text, said", [
    ("", "empty"),
    ("median_ape<8%", "'median_ape<8%' is not NAME<=VALUE"),
    ("mean_ape<=8%", "'mean_ape' is not one of median_ape, p90_ape"),
    ("median_ape<=0%", "must be above 0"),
    ("median_ape<=8%,median_ape<=9%", "median_ape is given twice"),
])
def test_bad_rules_name_the_field_and_the_value(text, said):
    with pytest.raises(UntilError) as caught:
        parse_until(text)
    assert str(caught.value).startswith("until: ") and said in str(caught.value)
