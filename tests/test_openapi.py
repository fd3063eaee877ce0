"""/openapi.json against the live server: schemathesis generates requests from the document
(derandomized, a few examples per operation) and checks every answer against it."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

# The Radiomics API's bodies are raw protobuf bytes: sent as generated (binary strings), whatever they hold,
# so its POST routes get arbitrary bytes here (and must answer them as documented, never 5xx).
schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")

OPERATIONS = ["GET /healthcheck", "GET /metrics", "GET /models", "GET /models/{family}", "POST /job/",
              "GET /query/{uid}", "POST /", "GET /api/ping", "GET /api/v2/VendorStatus", "GET /api/v2/Credits",
              "GET /api/v2/Model/", "GET /api/v2/Model/{ModelID}/segmentation/{SegmentationID}",
              "GET /api/v2/Model/{ModelID}/segmentation/{SegmentationID}/result",
              "POST /api/v2/Model/{ModelID}/segmentation", "POST /api/v2/Feedback/segmentation",
              "POST /api/v2/Telemetry/segmentation"]


def test_document_lists_the_served_commands(server):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    served = {m["inference_command"] for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]}
    enum = document["components"]["schemas"]["Models"]["properties"]["models"]["items"]["properties"]
    assert set(enum["inference_command"]["enum"]) == served
    assert {"/healthcheck", "/models", "/job/", "/query/{uid}", "/", "/metrics"} <= set(document["paths"])
    models = requests.get(f"{server.url}/api/v2/Model/", timeout=10).json()["Models"]
    model_ids = document["paths"]["/api/v2/Model/{ModelID}/segmentation"]["post"]["parameters"][0]["schema"]["enum"]
    assert sorted(model_ids) == sorted(v["ID"] for family in models for v in family["ModelVersions"])


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
