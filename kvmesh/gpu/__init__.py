"""Device side: model, KV block pool, block-packing kernels.

This package's __init__ imports nothing: block_pool and model_config are torch-free, and
the frontend imports model_config without paying for torch. The block hash lives below
this package, in kvmesh.kv.block_hash.
"""
