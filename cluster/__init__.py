"""expertmesh.cluster: the control plane. Here: routing statistics in Redis.

    recorder   RedisStatsSink / StatsRecorder: what workers use to record routing (injected, picklable sink)
    store      StatsStore: windows under one key prefix per model/run, exact snapshots, decayed aggregate
    cli        `expertmesh stats ...` and load_stats_url() for `--stats redis://...?model=M`
    codec      the compact binary form of a window;  window: WindowCounts, the layout the store keeps
    counting   WindowAccumulator: counts exactly as placement.stats.stats_from_trace does
    connect    Redis URLs (redis://, rediss://, EXPERTMESH_REDIS_URL) and the store's errors
    scripts    the Lua scripts that make writes atomic and idempotent

Importing this package does not import redis; only talking to a server does (the `stats` extra).
"""
