"""The tiered KV block store of the cache actor: host DRAM in shared memory, then disk.

eviction.py   lru / lfu / fifo policies, picked by name (kv.eviction)
host_tier.py  HostTier: slots in one shared-memory segment, read and written by workers
disk_tier.py  DiskTier: one checksummed file per block
store.py      TieredStore: both tiers, demotion, promotion, KV events, counters
"""
