"""Triton kernels of ffr_fast's ops, one file per op; installed as the subpackage
ffr_fast.kernels. Importing this package does not import Triton: each op's module does, so
a machine without Triton (or one that must set TRITON_INTERPRET first) is unaffected."""
