"""The public surface of expertmesh.cluster: names re-exported lazily, old module paths kept as aliases.

    .venv/bin/python -m pytest -q tests/cluster/test_package.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_importing_the_package_loads_no_statistics_module_nor_redis():
    out = _run("import sys, expertmesh.cluster; "
               "print(sorted(m for m in sys.modules if m.startswith(('expertmesh.cluster.', 'redis', 'numpy'))))")
    assert out == "['expertmesh.cluster.stats']"  # the name index only


def test_what_users_import_comes_from_the_package():
    import expertmesh.cluster as cluster
    from expertmesh.cluster import RedisStatsSink, StatsStore, load_stats_url
    from expertmesh.cluster.stats.recorder import RedisStatsSink as defined
    from expertmesh.cluster.stats.store import StatsStore as store_class
    from expertmesh.cluster.stats.store import load_stats_url as loader

    assert (RedisStatsSink, StatsStore, load_stats_url) == (defined, store_class, loader)
    for name in cluster.__all__:  # every advertised name resolves
        assert getattr(cluster, name) is not None, name
    assert set(cluster.__all__) <= set(dir(cluster))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        cluster.Nope  # noqa: B018
    sink = RedisStatsSink(url=None, model="m", num_layers=2, num_experts=4, top_k=2, run="r")
    assert (sink.model, sink.run, sink.num_layers) == ("m", "r", 2)
