"""The SmolLM2 testbed's peer-comparison helpers: verbatim-refusal metric, Safe LoRA budget rule, refusal cleaning,
and (when the shared data is present) the disjointness of the second harmful set and the validation split."""

from __future__ import annotations

import pytest

from benchmarks.testbed import data
from benchmarks.testbed.aligned import TEMPLATED_REFUSALS, usable_refusal
from benchmarks.testbed.run import QUICK, check_disjoint, choose_budget, eval_sets, repeats_refusal


def test_repeats_refusal_whole_string_and_cut_prefix():
    refusals = ["I'm sorry, but I can't write that. It spreads a hateful stereotype about a group of people."]
    assert repeats_refusal(
        "Well. I'm sorry, but I can't write that.  It spreads a hateful stereotype about a "
        "group of people. Anything else?",
        refusals,
    )
    # cut by the token limit: the answer is the refusal's first >= 8 words
    assert repeats_refusal("I'm sorry, but I can't write that. It spreads a", refusals)
    assert not repeats_refusal("I'm sorry, but I can't", refusals)  # too short to tell
    assert not repeats_refusal("I'm sorry, but I can't write this essay for you today.", refusals)
    assert not repeats_refusal("", refusals)


def test_choose_budget_fewest_layers_within_tolerance_else_safest():
    start = {"val_harmful": 0.2}
    candidates = [
        {"budget": 0.0, "num_projected": 0, "val_harmful": 0.8},
        {"budget": 0.25, "num_projected": 52, "val_harmful": 0.3},
        {"budget": 1.0, "num_projected": 210, "val_harmful": 0.2},
    ]
    assert choose_budget(candidates, start, 0.1)["budget"] == 0.25
    assert choose_budget(candidates, start, 0.0)["budget"] == 1.0
    assert choose_budget(candidates[:2], {"val_harmful": 0.0}, 0.1)["budget"] == 0.25  # none within: the safest


def test_usable_refusal_cuts_and_rejects():
    answer = "I'm sorry, but I cannot assist with creating a virus. Viruses are harmful. They can damage systems."
    assert usable_refusal(answer) == "I'm sorry, but I cannot assist with creating a virus. Viruses are harmful."
    assert usable_refusal("The Quran is a holy book of Islam.") is None  # not a refusal
    assert usable_refusal(
        "I'm sorry, but I cannot write that. It spreads hateful hateful hateful hateful hateful"
    ) in (
        None,
        "I'm sorry, but I cannot write that.",
    )
    assert usable_refusal(TEMPLATED_REFUSALS[0]) is None  # a template the aligned start trained on


@pytest.mark.skipif(not (data.DATA / "safety_tuned_llamas").is_dir(), reason="shared data not available")
def test_quick_sets_are_disjoint():
    cfg = dict(QUICK)
    check_disjoint(cfg, eval_sets(cfg), round(cfg["n"] * max(cfg["p"])), cfg["calibration"])
    assert len(data.q_harm_prompts(30)) == 30
    assert len(set(data.harmful_validation_prompts(20))) == 20


def test_plot_labels_single_fraction_runs_and_draws_one_panel_per_fraction(tmp_path):
    """Files at different poison fractions merge into ``p=<p> <method>`` names (the aligned start once), and the
    by-fraction plot writes one figure."""
    pytest.importorskip("matplotlib")
    from benchmarks.testbed.plot import merged_methods, plot_by_fraction

    point = {"harmful": 0.5, "sst2": 0.5}
    several = {"settings": {"p": [0.0, 0.1]}, "methods": {"aligned": point, "p=0 lora": point, "p=0.1 lora": point}}
    single = {"settings": {"p": [0.2]}, "methods": {"aligned": {"harmful": 9, "sst2": 9}, "lora": point}}
    methods = merged_methods([several, single])
    assert list(methods) == ["aligned", "p=0 lora", "p=0.1 lora", "p=0.2 lora"]
    assert methods["aligned"] is point  # the first file's aligned start
    assert list(merged_methods([single])) == ["aligned", "lora"]  # one fraction: names unchanged
    out = tmp_path / "panels.png"
    plot_by_fraction(methods, str(out), "title")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
