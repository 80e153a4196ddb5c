"""How the sweep picks the weight the demo uses: one rule for every method."""
from ffr_fast.study.sweep import Point, choose_weights


def point(method, weight, finetuned, pruned, seed=0, keep=0.5):
    return Point(method, seed, keep, trained=0.99, pruned=pruned, finetuned=finetuned,
                 flops_kept=keep - 0.01, branches_removed=0, weight=weight, seconds=1.0)


def test_a_tie_within_one_image_goes_to_the_model_removal_hurt_least():
    points = [point("ffr", 0.01, 0.996, 0.10), point("ffr", 1.0, 0.993, 0.99),
              point("ffr", 3.0, 0.985, 0.99), point("none", 0.0, 0.98, 0.1),
              point("ffr", 0.01, 0.5, 0.5, keep=0.25)]  # another budget: not looked at
    chosen = choose_weights(points, 0.5, tie=0.004)
    assert chosen["ffr"] == {"weight": 1.0, "finetuned": 0.993, "pruned": 0.99,
                             "grid_points": 3}
    assert chosen["none"]["weight"] == 0.0 and chosen["none"]["grid_points"] == 1


def test_without_a_tie_the_best_fine_tuned_accuracy_wins():
    points = [point("slimming", 0.01, 1.0, 0.14), point("slimming", 1e-4, 0.99, 0.5)]
    assert choose_weights(points, 0.5, tie=0.004)["slimming"]["weight"] == 0.01
    assert choose_weights(points, 0.5, tie=0.02)["slimming"]["weight"] == 1e-4


def test_seeds_are_averaged_before_choosing():
    points = [point("layerdrop", 0.1, 1.0, 0.9, seed=0), point("layerdrop", 0.1, 0.90, 0.9, seed=1),
              point("layerdrop", 0.3, 0.96, 0.9, seed=0),
              point("layerdrop", 0.3, 0.96, 0.9, seed=1)]
    chosen = choose_weights(points, 0.5, tie=0.001)["layerdrop"]
    assert chosen["weight"] == 0.3 and abs(chosen["finetuned"] - 0.96) < 1e-12


def test_a_rerun_keeps_the_points_at_the_budgets_asked_again(tmp_path):
    import json
    from dataclasses import asdict

    from ffr_fast.study.sweep import _previous_points

    settings = {"recipe": {"epochs": 10}, "keep": [0.5, 0.25]}
    points = [point("ffr", 1.0, 0.99, 0.9), point("ffr", 1.0, 0.9, 0.5, keep=0.25)]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"settings": settings, "points": [asdict(p) for p in points]}))
    assert _previous_points(path, dict(settings, keep=[0.5])) == points[:1]
    assert _previous_points(path, settings) == points
    assert _previous_points(path, {"recipe": {"epochs": 5}, "keep": [0.5]}) == []
