"""The demo's seed aggregation and its comparison sentences, on fake per-seed results."""
import statistics

import pytest

from ffr_fast.study.demo import (
    CNN,
    GRID_SIZE,
    STORIES,
    SeedResult,
    Spread,
    aggregate,
    comparisons,
    within_spread,
)


def result(method, seed, finetuned, pruned=0.9, keep=0.5, branches=3):
    return SeedResult(method, seed, keep, trained=0.99, pruned=pruned, finetuned=finetuned,
                      flops_kept=keep - 0.02 * seed, params=1000 + seed, branches_removed=branches)


def test_spread_is_mean_sample_std_and_range():
    spread = Spread.of([0.97, 0.99, 0.98])
    assert spread.mean == pytest.approx(0.98) and spread.n == 3
    assert spread.std == pytest.approx(statistics.stdev([0.97, 0.99, 0.98]))
    assert (spread.low, spread.high) == (0.97, 0.99)
    assert Spread.of([0.5]).std == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        Spread.of([])


def test_aggregate_groups_by_method_and_budget_over_seeds():
    results = [result("ffr", 0, 0.98), result("none", 0, 0.95), result("ffr", 1, 0.96),
               result("none", 1, 0.97), result("ffr", 2, 0.97),
               result("ffr", 0, 0.80, keep=0.25), result("none", 2, 0.99)]
    summaries = aggregate(results)
    assert [(s.method, s.keep, s.seeds) for s in summaries] == [
        ("ffr", 0.5, [0, 1, 2]), ("none", 0.5, [0, 1, 2]), ("ffr", 0.25, [0])]
    ffr = summaries[0]
    assert ffr.finetuned.mean == pytest.approx(0.97)
    assert ffr.finetuned.std == pytest.approx(0.01)
    assert ffr.flops_kept.low == pytest.approx(0.46) and ffr.params.high == 1002
    assert summaries[2].finetuned.n == 1


def test_aggregate_refuses_a_seed_counted_twice():
    with pytest.raises(ValueError, match="ffr at 0.5: seed 1 twice"):
        aggregate([result("ffr", 1, 0.9), result("ffr", 1, 0.8)])


def test_comparisons_say_who_leads_and_when_it_is_within_the_spread():
    results = [result("ffr", s, f, pruned=p) for s, f, p in
               ((0, 0.97, 0.95), (1, 0.98, 0.96), (2, 0.99, 0.97))]
    results += [result("none", s, f, pruned=p) for s, f, p in
                ((0, 0.975, 0.10), (1, 0.985, 0.20), (2, 0.995, 0.30))]
    lines = comparisons(aggregate(results))
    assert lines == ["at 50% FLOPs, ffr - none: pruned +76.0 points (FFR ahead), "
                     "finetuned -0.5 points (within the spread)"]
    assert within_spread(Spread.of([1.0, 1.0]), Spread.of([1.0, 1.0]))
    assert not within_spread(Spread.of([1.0, 1.0]), Spread.of([0.9, 0.9]))


def test_every_weighted_method_has_the_same_number_of_grid_points():
    for story in STORIES.values():
        for method in story.methods:
            if method.regularizer == "none":
                assert method.grid == (0.0,) and method.weight == 0.0
            else:
                assert len(method.grid) == GRID_SIZE and method.weight in method.grid
    assert {m.name for m in CNN.methods} == {"none", "slimming", "ffr", "shortgpt",
                                              "layerdrop"}
