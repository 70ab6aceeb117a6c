"""expertmesh.cluster.stats: routing statistics in Redis, from the writers that count them to the planner.

    recorder   RedisStatsSink / StatsRecorder: what workers use to record routing (injected, picklable sink)
    store      StatsStore: windows under one key prefix per model/run, exact snapshots; load_stats_url()
    keys       the key names and header of a model/run;  retention: decayed aggregate, compaction
    cache      what a reader keeps between snapshots
    push       push_routing(): a routing file as windows, once per source (resumable); `stats push`
    cli        `expertmesh stats ...`
    codec      the compact binary form of a window;  window: WindowCounts, the layout the store keeps
    counting   WindowAccumulator: counts exactly as placement.stats.stats_from_trace does
    connect    Redis URLs (redis://, rediss://, EXPERTMESH_REDIS_URL) and the store's errors
    scripts    the Lua scripts that make writes atomic and idempotent

Layering: imports `expertmesh.placement` only (never torch, Ray, workers or kernels); redis (the `stats`
extra) is imported when a URL is parsed or a store talks to a server, never when a module is imported.
"""

from __future__ import annotations

import importlib

# name -> module that defines it; loaded on first use, so importing the package costs nothing.
_HOMES = {
    "RedisStatsSink": "recorder",
    "StatsRecorder": "recorder",
    "RecorderStatus": "recorder",
    "StatsStore": "store",
    "load_stats_url": "store",
    "push_routing": "push",
    "StatsTarget": "connect",
    "parse_target": "connect",
    "ENV_URL": "connect",
    "StatsStoreError": "connect",
    "StatsUnavailableError": "connect",
    "StatsSchemaError": "connect",
    "StatsEndpointError": "connect",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
