"""expertmesh.cluster: the control plane, one subpackage per capability, each with its own layering rule.

    stats       routing statistics in Redis: store, codec, recorder sinks, `expertmesh stats`
                (may import placement only)
    serve       the serving engine and its gRPC services (may import placement, stats, workers, protos)
    controller  the rebalance loop (may import placement, stats, protos; never workers or torch)

What users import from the statistics is re-exported here, e.g. `from expertmesh.cluster import RedisStatsSink`.
Importing this package loads no statistics module (nor numpy or redis), only the index of their names:
a name is loaded when it is first used.
"""

from __future__ import annotations

from .stats import __all__ as _STATS_NAMES

__all__ = list(_STATS_NAMES)


def __getattr__(name: str):
    if name in _STATS_NAMES:
        from . import stats

        return getattr(stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
