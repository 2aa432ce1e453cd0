"""Custom kernels. One file per kernel: the Triton kernel, its launcher, and a
pure-torch reference with the same signature, plus `_backend.choose` which
picks one. Nothing here is stateful and nothing here imports `mcp`.
"""
