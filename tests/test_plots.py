"""The study's figures leave the caller's matplotlib alone."""
import subprocess
import sys


def test_importing_and_drawing_keeps_the_callers_backend(tmp_path):
    script = f"""
import matplotlib
matplotlib.use("svg")
from ffr_fast.study import plots
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
points = [{{"method": "ffr", "keep": 0.5, "flops_kept": 0.45, "finetuned": 0.9,
           "pruned": 0.8}}]
path = plots.frontier(points, points, r"{tmp_path / 'frontier.png'}", {{"ffr": "FFR"}},
                      "ResNet-20", 0.95)
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
import matplotlib.pyplot as plt
assert plt.get_fignums() == [], plt.get_fignums()  # nothing left open in pyplot
print(path.stat().st_size)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 1000
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
