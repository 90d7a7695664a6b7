"""The OpenAPI document, the offline docs page, and a schemathesis run against the live server."""
import re

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate

import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
EXAMPLES_PER_OPERATION = 8


@pytest.fixture(scope="module")
def spec():
    """The document as served (no database involved), once for the module."""
    from fleet_server.app import create_app

    app = create_app({"SQLALCHEMY_DATABASE_URI": "sqlite:///:memory:", "FLEET_SECRET_KEY": _key()})
    return app.test_client().get("/openapi.json").get_json()


def _key():
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def test_the_openapi_document_is_valid_openapi_3(spec):
    validate(spec)
    assert spec["openapi"].startswith("3.")


def test_every_seed_endpoint_is_documented(spec):
    paths = spec["paths"]
    expected = {
        "/docker/registries/": {"get", "post"},
        "/docker/registries/{registry_id}/": {"get", "put", "patch", "delete"},
        "/docker/projects/": {"get", "post"},
        "/docker/projects/{project_id}/": {"get", "put", "patch", "delete"},
        "/docker/projects/{project_pk}/releases/": {"get", "post"},
        "/docker/projects/{project_pk}/releases/{release_id}/": {"get", "put", "patch", "delete"},
        "/docker/projects/{project_pk}/releases/hash/{version_hash}/": {"get"},
        "/dongle/devices/": {"get", "post"},
        "/dongle/devices/{device_id}/": {"get", "put", "patch", "delete"},
        "/auth/tokens/": {"get", "post"},
        "/auth/tokens/{token_id}/": {"get", "delete"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
        for method in methods:
            assert "default" in paths[path][method]["responses"], (path, method)  # the error shape


def test_the_seed_release_payload_is_the_documented_example(spec):
    body = spec["paths"]["/docker/projects/{project_pk}/releases/"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"]["containers"][0]["name"] == "curveball"
    assert body["example"]["remove_containers"] == ["curveball", "ravendb"]


def test_the_registry_password_is_documented_write_only(spec):
    registry = spec["components"]["schemas"]["Registry"]["properties"]
    assert registry["password"]["writeOnly"] is True


def test_the_docs_page_loads_its_assets_from_this_server_only(live):
    page = live.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    for source in sources:
        asset = live.get(source)
        assert asset.status_code == 200 and len(asset.content) > 1000, source
    assert live.get("/openapi.json").json()["info"]["title"] == "Fleet"


def _seed(live):
    """Something for the item endpoints to find: a registry, project, device, release and token."""
    registry = live.post("/docker/registries/", json={"name": "r", "url": "127.0.0.1:5000"}).json()
    project = live.post("/docker/projects/", json={"name": "p"}).json()
    device = live.post("/dongle/devices/", json={"name": "d"}).json()
    body = {"version": "1", "devices": [device["id"]],
            "containers": [{"name": "a", "image": "app", "tag": "v1", "registry": registry["id"]}]}
    assert live.post(f"/docker/projects/{project['id']}/releases/", json=body).status_code == 201


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(live):
    _seed(live)
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    headers = {"Authorization": f"APIToken {live.token}"}
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "DELETE" and operation.path.startswith("/auth/tokens/"):
            continue  # revoking the token under test would turn the rest of the run into 401s

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS)

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
