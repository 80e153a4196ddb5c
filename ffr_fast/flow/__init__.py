"""The FFR half of ffr_fast: the penalty on a network's feature flow and the loss that
trains with it.

Modules: reference (the math in plain PyTorch: the oracle and the fallback), ops (the
`ffr_fast::flow_sums` and `ffr_fast::flow_penalty` ops, declared once with torch.library:
schema, fake kernels, one autograd, the C++ and Triton kernels per device), penalty (the
entry points `flow_penalty` and `flow_penalty_chains`, validation once per layout), loss
(`FFRLoss`: the penalty of what the hooks captured, its description), hooks (`FlowHooks`,
what FFRLoss stands on: the hooks, what they keep of each training forward, their
lifetime), stream (where the feature flow is: the residual stream of the model's
torch.export capture), chains (how captured features form chains). The public names are
importable from `ffr_fast` itself.
"""
