import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported: without a GPU its kernels run on
# CPU tensors in the interpreter, so CI tests every Triton kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
