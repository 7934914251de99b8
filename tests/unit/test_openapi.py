"""The OpenAPI document describes exactly the routes the app serves under /api/v1."""
from __future__ import annotations

from iotflow.app import create_app
from iotflow.settings import Settings
from iotflow.web.openapi import document


def test_the_document_lists_exactly_the_served_api_operations(tmp_path):
    app = create_app(Settings.from_env({"IOTFLOW_DATA_DIR": str(tmp_path)}))
    served = {(route.method.lower(), route.resource.canonical)
              for route in app.web.web_app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/api/v1")
              and route.method != "HEAD"}
    documented = {(method, path) for path, operations in document()["paths"].items() for method in operations}
    assert documented == served


def test_every_operation_but_the_document_itself_needs_a_bearer_token():
    for path, operations in document()["paths"].items():
        for method, operation in operations.items():
            assert ("security" in operation) == (path != "/api/v1/openapi.json"), (method, path)
