"""The README's Python examples run as written, on a tiny loader, so they cannot go stale."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    torch.manual_seed(0)
    # what the examples call `loader` and `train_loader`: two small batches of CIFAR shape
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"),
         {"loader": batches, "train_loader": batches})


def test_the_library_imports_without_the_study_extra():
    """`pip install ffr_fast` without extras: FFRLoss, flow_penalty and prune work with no
    matplotlib, tqdm or torchvision importable."""
    code = """
import sys
for name in ("matplotlib", "tqdm", "torchvision"):
    sys.modules[name] = None  # importing it now raises ImportError
import torch, ffr_fast
from ffr_fast import models
model = models.resnet20().train()
ffr = ffr_fast.FFRLoss(model)
loss = model(torch.randn(2, 3, 32, 32)).sum() + ffr()
loss.backward()
ffr.remove()
print(ffr_fast.flow_penalty([torch.randn(2, 5), torch.randn(2, 5)]).item() > 0)
result = ffr_fast.prune(model.eval(), torch.randn(1, 3, 32, 32), ratio=0.5)
print(result.report.flops_after < result.report.flops_before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_the_repository_never_points_outside_itself():
    root = README.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    outside = ("../" + "shared", "FFR" + "_SPEC")  # spelt apart so this file passes
    offenders = []
    for name in tracked.stdout.split():
        path = root / name
        text_file = path.suffix in {".py", ".md", ".cpp", ".h", ".txt", ".cfg", ".ini"}
        if text_file or name == "Makefile":
            text = path.read_text(errors="replace")
            if any(word in text for word in outside):
                offenders.append(name)
    assert offenders == []
