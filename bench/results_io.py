"""Where the table scripts put their output: bench/results/NAME.json (the data) and
NAME.md (the table a person reads), side by side, the table printed too; and the list of
targets such a table ends with."""
import json
from pathlib import Path
from typing import Dict, List

RESULTS = Path(__file__).resolve().parent / "results"


def publish_results(name: str, data: dict, markdown: str) -> None:
    """Write bench/results/NAME.json and NAME.md, and print the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def target_lines(targets: Dict[str, bool]) -> List[str]:
    """One Markdown list item per target: its name and whether the run met it."""
    return [f"- {name}: {'met' if met else 'NOT met'}" for name, met in targets.items()]
