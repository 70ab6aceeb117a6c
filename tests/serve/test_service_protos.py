"""The committed gRPC stubs match the .proto files; the protos load and describe the API we document.

    .venv/bin/python -m pytest -q tests/serve/test_service_protos.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the stubs")


def test_committed_stubs_are_fresh():
    from expertmesh.protos.generate import stale

    assert stale() == [], "the generated code under protos/v1/ is stale: run `make protos` and commit it"


def test_staleness_check_notices_an_edit(tmp_path):
    """The check must fail on a changed, a missing and a leftover file, or it protects nothing."""
    from expertmesh.protos.generate import OUT_DIR, stale

    for path in OUT_DIR.glob("*_pb2*"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "admin_pb2.py").write_text((tmp_path / "admin_pb2.py").read_text() + "# edited\n")
    (tmp_path / "inference_pb2.pyi").unlink()
    (tmp_path / "old_pb2.py").write_text("")
    assert stale(tmp_path) == ["admin_pb2.py", "inference_pb2.pyi", "old_pb2.py"]


def test_services_are_registered_under_the_versioned_package():
    from google.protobuf import descriptor_pool

    from expertmesh.protos.v1 import admin_pb2, inference_pb2  # noqa: F401 - registers the descriptors

    pool = descriptor_pool.Default()
    inference = pool.FindServiceByName("expertmesh.v1.InferenceService")
    assert {m.name: (m.client_streaming, m.server_streaming) for m in inference.methods} == {
        "Generate": (False, True), "Score": (False, False), "ListModels": (False, False)}
    admin = pool.FindServiceByName("expertmesh.v1.AdminService")
    assert {m.name for m in admin.methods} == {"GetStatus", "GetPlan", "GetRoutingSummary", "Drain"}
