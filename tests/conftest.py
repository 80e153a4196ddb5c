import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported: without a GPU its kernels run on
# CPU tensors in the interpreter, so CI tests every Triton kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the tests are small, and the distributed tests run
# several processes on a 2-core machine, where OpenMP threads would oversubscribe the cores.
# Tests of the parallel kernels choose their thread counts themselves.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits():
    """The digits data set, split: what the study's tests train on. Imported when first
    used, so that nothing of ffr_fast is imported before TRITON_INTERPRET is set above."""
    from ffr_fast.study import data
    return data.load_digits()
