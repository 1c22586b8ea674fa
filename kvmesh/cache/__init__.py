"""The tiered KV block store of the cache actor: host DRAM in shared memory, then disk,
then an S3-compatible bucket.

eviction.py   lru / lfu / fifo policies, picked by name (kv.eviction)
host_tier.py  HostTier: slots in one shared-memory segment, read and written by workers
disk_tier.py  DiskTier: one checksummed file per block
object_tier.py ObjectTier: one checksummed object per block in a bucket (kv.object_url)
store.py      TieredStore: the tiers, demotion, promotion, KV events, counters
"""
