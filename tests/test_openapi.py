"""/openapi.json against the live server: schemathesis generates requests from the document
(derandomized, a few examples per operation) and checks every answer against it."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

OPERATIONS = ["GET /healthcheck", "GET /metrics", "GET /models", "GET /models/{family}", "POST /job/",
              "GET /query/{uid}", "POST /"]


def test_document_lists_the_served_commands(server):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    served = {m["inference_command"] for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]}
    enum = document["components"]["schemas"]["Models"]["properties"]["models"]["items"]["properties"]
    assert set(enum["inference_command"]["enum"]) == served
    assert {"/healthcheck", "/models", "/job/", "/query/{uid}", "/", "/metrics"} <= set(document["paths"])


@pytest.mark.parametrize("operation", OPERATIONS)
def test_server_conforms_to_its_openapi_document(server, operation):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    method, path = operation.split(" ")
    api_operation = schema[path][method]

    @given(api_operation.as_strategy())
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case):
        # every other check runs; a schema-valid folder name need not exist on the server (a 422
        # saying so is right), which no schema can express
        case.call_and_validate(timeout=30, excluded_checks=[positive_data_acceptance])

    check()
