"""How the table scripts time things on a shared machine: interleaved rounds, so that a
drift of the machine's speed hits every method alike and the ratios stay side by side; and
the options every table script takes to say how many rounds, on how many threads."""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


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


def table_parser(doc: str, threads: Optional[int], batch: Optional[int] = None,
                 rounds: int = 7) -> argparse.ArgumentParser:
    """A table script's parser (described by its docstring's first line) with --rounds of
    interleaved timing, --threads for torch (default `threads`; None: torch's own choice, 1
    where a busy shared machine would leave extra threads waiting) and, where the script
    times one batch size, --batch. The script adds its own options to it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds, help=f"default {rounds}")
    if batch is not None:
        parser.add_argument("--batch", type=int, default=batch, help=f"default {batch}")
    parser.add_argument("--threads", type=int,
                        default=torch.get_num_threads() if threads is None else threads,
                        help="torch threads (default: "
                        + ("torch's choice)" if threads is None else f"{threads})"))
    return parser
