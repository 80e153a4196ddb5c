"""prune(flops_target=...): the search for the smallest pruning that keeps at most a
fraction of the FLOPs, over a threshold or a ratio."""
import warnings
from typing import Callable, Dict, List, Optional


class FlopsTargetWarning(UserWarning):
    """prune(flops_target=...) could not land within the tolerance; the report says where."""



def search_flops(prune_once: Callable, model, inputs, target: float, search: str,
                 tolerance: float, steps: int, inplace: bool, options: Dict):
    """Search `search` ("threshold" or "ratio") until the FLOPs kept fall in
    [target - tolerance, target]: the value is raised (a threshold doubled, since its scale
    is the model's) until the budget is met, then bisected (geometrically for a threshold).
    Every candidate prunes a copy (`prune_once`: a path's one pruning); the chosen one is
    redone with `inplace` if asked, and then no candidate's model is kept (one copy at a
    time, not one per step)."""
    low, high = 0.0, None  # kept(low) > target >= kept(high)
    value = 1 - target ** 0.5 if search == "ratio" else 1.0
    tried: List[tuple] = []  # (kept, value)
    for _ in range(steps):
        result = prune_once(model, inputs, **{search: value}, **_other(search),
                             inplace=False, **options)
        kept = result.report.flops_after / result.report.flops_before
        tried.append((kept, value, None if inplace else result))
        if target - tolerance <= kept <= target:
            break
        if kept <= target:
            high = value
        else:
            low = value
        value = _next_value(low, high, search)
        if value is None:
            break
    under = [t for t in tried if t[0] <= target]
    kept, value, result = (max(under, key=lambda t: t[0]) if under
                           else min(tried, key=lambda t: t[0]))
    if inplace:
        result = prune_once(model, inputs, **{search: value}, **_other(search), inplace=True,
                             **options)
    report = result.report
    report.settings.update(flops_target=target, flops_search=search,
                           flops_tolerance=tolerance)
    if not target - tolerance <= kept <= target:
        near = sorted(t[0] for t in tried)
        below = max((k for k in near if k <= target), default=None)
        above = min((k for k in near if k > target), default=None)
        message = (f"flops_target={target:.1%} (tolerance {tolerance:.1%}) not reached by the "
                   f"{search} search: kept {kept:.1%} of the FLOPs ({search}={value:.4g}); "
                   f"the nearest candidates kept {_pct(below)} and {_pct(above)}")
        report.warnings.append(message)
        warnings.warn(message, FlopsTargetWarning, stacklevel=3)
    return result


def _other(search: str) -> dict:
    return {"ratio": None} if search == "threshold" else {"threshold": None}


def _next_value(low: float, high: Optional[float], search: str) -> Optional[float]:
    if search == "ratio":
        value = (low + (0.99 if high is None else high)) / 2
        return None if high is None and low >= 0.98 else value
    if high is None:
        return 2 * low if low < 1e12 else None
    return (low * high) ** 0.5 if low > 0 else high / 2


def _pct(fraction: Optional[float]) -> str:
    return "nothing" if fraction is None else f"{fraction:.1%}"
