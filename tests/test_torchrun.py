"""`train` under torchrun with two CPU processes (DDP over gloo) keeps the ranks in sync."""
import json
import os
import subprocess
import sys

from ffr_fast.study import checkpoint, train


def test_two_process_train_keeps_ranks_in_sync(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "ffr_fast", "train", "--out", str(tmp_path),
               "--epochs", "2", "--max-batches", "2", "--batch-size", "16",
               "--regularizer", "ffr", "--weight", "0.01", "--json", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # printed by rank 0 only
    digests = summary["param_digests"]  # parameters and buffers, one hash per rank
    assert len(digests) == 2 and digests[0] == digests[1], digests
    state = checkpoint.load(tmp_path / checkpoint.FILENAME)
    assert state["epoch"] == 2
    assert train.parameter_digest(checkpoint.build_model(state)) == digests[0]
