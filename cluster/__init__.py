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

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .stats import __all__ as _STATS_NAMES

__all__ = list(_STATS_NAMES)


def __getattr__(name: str):
    if name in _STATS_NAMES:
        from . import stats

        return getattr(stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


# The statistics modules lived directly in this package until they moved to `stats/`; their old paths
# (`expertmesh.cluster.recorder`, ...) stay importable, as the same module objects, with a warning.
_MOVED = frozenset({"cli", "codec", "connect", "counting", "recorder", "scripts", "show", "store", "window"})


class _MovedToStats(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = f"{__name__}.stats.{spec.name.rpartition('.')[2]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets the alias spec on it: put it back below
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _MovedToStats) for f in sys.meta_path):
    sys.meta_path.append(_MovedToStats())
