"""How the table scripts time things on a shared machine: interleaved rounds, so that a
drift of the machine's speed hits every method alike and the ratios stay side by side."""
import statistics
import time
from typing import Callable, Dict, List


def interleaved_medians(steps: Dict[str, Callable[[], None]], rounds: int,
                        repeats: int) -> Dict[str, List[float]]:
    """Per method, one median step time (seconds) per round; every round runs each method
    `repeats` times, one method after the other."""
    medians: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
    return medians
