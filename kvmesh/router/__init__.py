"""The router's decision logic, free of sockets: the KV index (which worker holds which
block, at which tier) and the routing policies. Torch-free: the router process imports
only this package, the protocol, the config schema and the block hash."""
