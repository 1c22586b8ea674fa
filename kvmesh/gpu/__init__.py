"""Device side: model, KV block pool, block-packing kernels.

This package's __init__ imports nothing: kvmesh.gpu.block_pool is torch-free and
is imported by the router, which must not pay for torch.
"""
