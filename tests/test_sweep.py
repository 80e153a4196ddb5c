"""How the sweep picks the weight the demo uses."""
from ffr_fast.study.sweep import choose_weights


def point(method, weight, finetuned, pruned):
    return {"method": method, "settings": {"weight": weight},
            "budgets": {"0.5": {"accuracy": finetuned, "pruned_accuracy": pruned}}}


def test_a_tie_within_one_image_goes_to_the_model_pruning_hurt_least():
    points = {"a": point("ffr", 0.01, 0.996, 0.10), "b": point("ffr", 1.0, 0.993, 0.99),
              "c": point("ffr", 3.0, 0.985, 0.99), "d": point("none", 0.0, 0.98, 0.1)}
    chosen = choose_weights(points, 0.5, tie=0.004)
    assert chosen["ffr"] == {"weight": 1.0, "accuracy": 0.993, "pruned_accuracy": 0.99}
    assert chosen["none"]["weight"] == 0.0


def test_without_a_tie_the_best_fine_tuned_accuracy_wins():
    points = {"a": point("slimming", 0.01, 1.0, 0.14), "b": point("slimming", 1e-4, 0.99, 0.5)}
    assert choose_weights(points, 0.5, tie=0.004)["slimming"]["weight"] == 0.01
    assert choose_weights(points, 0.5, tie=0.02)["slimming"]["weight"] == 1e-4
