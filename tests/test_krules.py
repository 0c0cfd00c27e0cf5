"""The K-selection rules are one registry (tardis_exp/krules.py): params.py's choices, select_k,
the k_selection.png panels and ``auto`` all read it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tardis_exp.errors import ConfigError
from tardis_exp.krules import AUTO, K_RULES, RULES, panels, resolve_k_rule, select_k
from tardis_exp.params import ConsensusParams, check

KS = [3, 4, 5, 6, 7]
# a curve, higher is better, whose answer is K = 5 under every rule's reading: its best value,
# the last K before its first drop (0.9 -> 0.0), the last K whose gain over K - 1 is above the
# tolerance (0.2, 0.9, then 0.0)
BETTER = np.array([0.1, 0.2, 0.9, 0.0, -0.1])


def test_the_parameter_accepts_exactly_the_registry():
    meta = {f.name: f.metadata for f in dataclasses.fields(ConsensusParams)}["k_selection"]
    assert meta["choices"] == K_RULES == ("auto", *RULES)
    for name in K_RULES:
        method = next(m for m in ("components", "spots") if name == "auto" or m in RULES[name].methods)
        assert check("consensus", {"k_selection": name, "method": method}, known_only=True)["k_selection"] == name
    with pytest.raises(ConfigError, match=r"^consensus.k_selection='nope' is unknown"):
        check("consensus", {"k_selection": "nope"}, known_only=True)
    # a rule on a method that does not measure its statistic: refused, naming both keys
    for name, rule in RULES.items():
        for method in {"components", "spots"} - set(rule.methods):
            with pytest.raises(ConfigError, match=f"consensus.k_selection={name} needs consensus.method="):
                check("consensus", {"k_selection": name, "method": method}, known_only=True)


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_reads_its_statistic_in_its_orientation(name):
    rule = RULES[name]
    stats = {rule.statistic: BETTER if rule.higher_is_better else 1.0 - BETTER}
    assert select_k(KS, stats, name, tolerance=0.05) == 5
    # the opposite orientation puts the answer elsewhere: the registry's orientation is read
    flipped = {rule.statistic: 1.0 - BETTER if rule.higher_is_better else BETTER}
    assert select_k(KS, flipped, name, tolerance=0.05) != 5


def test_auto_is_the_registry_entry_per_method():
    assert resolve_k_rule("auto", "components") == AUTO["components"] == "recurrence"
    assert resolve_k_rule("auto", "spots") == AUTO["spots"] == "pac"
    assert resolve_k_rule("silhouette", "spots") == "silhouette"
    # select_k without a method: the components' rule where its statistic was measured
    rec = {"recurrence": BETTER, "pac": np.array([0.0, 0.0, 0.0, 0.0, 0.5])}
    assert select_k(KS, rec, "auto", tolerance=0.05) == select_k(KS, rec, "recurrence", tolerance=0.05) == 5
    del rec["recurrence"]
    assert select_k(KS, rec, "auto", tolerance=0.05) == select_k(KS, rec, "pac", tolerance=0.05) == 6


def test_k_selection_panels_are_the_rules_statistics():
    c = {key: BETTER for key in ("recurrence", "pac", "cophenetic", "delta_area", "silhouette", "area")}
    assert panels(c) == [("recurrence", "replicate recurrence"), ("pac", "PAC (lower is better)"),
                         ("cophenetic", "cophenetic correlation"), ("delta_area", "delta area"),
                         ("silhouette", "silhouette")]
    del c["recurrence"]  # method=spots measures no recurrence
    assert [key for key, _ in panels(c)] == ["pac", "cophenetic", "delta_area", "silhouette"]
