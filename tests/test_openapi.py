"""The OpenAPI document, the offline docs page, and a schemathesis run against the live server."""
import collections
import re

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate

import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ensure_resource_availability,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
EXAMPLES_PER_OPERATION = 8
# A bounded stateful run: scenarios × steps requests at most.
STATEFUL_SCENARIOS = 12
STATEFUL_STEPS = 8


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


def test_every_autopi_endpoint_is_documented(spec):
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


def test_autopis_release_payload_is_the_documented_example(spec):
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


def _populate(live):
    """Something for the item endpoints to find: a registry, project, device, release and token."""
    registry = live.post("/docker/registries/", json={"name": "r", "url": "127.0.0.1:5000"}).json()
    project = live.post("/docker/projects/", json={"name": "p"}).json()
    device = live.post("/dongle/devices/", json={"name": "d"}).json()
    body = {"version": "1", "devices": [device["id"]],
            "containers": [{"name": "a", "image": "app", "tag": "v1", "registry": registry["id"]}]}
    assert live.post(f"/docker/projects/{project['id']}/releases/", json=body).status_code == 201


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(live):
    _populate(live)
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


# negative_data_rejection stays with the stateless run: here the token the test adds to every call would
# undo schemathesis' "no Authorization header" mutations and report them as accepted invalid data.
STATEFUL_CHECKS = [check for check in CHECKS if check is not negative_data_rejection] + [
    use_after_free, ensure_resource_availability]
LINKED_SOURCES = {
    "/docker/projects/", "/docker/registries/", "/dongle/devices/", "/docker/projects/{project_pk}/releases/",
    "/dongle/devices/{device_pk}/execute/",
}


def test_every_created_resource_links_to_its_operations(spec):
    for path in LINKED_SOURCES:
        links = spec["paths"][path]["post"]["responses"]["201"]["links"]
        for name, link in links.items():
            pointer, method = link["operationRef"].removeprefix("#/paths/").rsplit("/", 1)
            target_path = spec["paths"][pointer.replace("~1", "/").replace("~0", "~")]
            parameters = target_path.get("parameters", []) + target_path[method].get("parameters", [])
            declared = {p["name"] for p in parameters if p["in"] == "path"}
            assert set(link["parameters"]) == declared, (path, name)
    project_links = spec["paths"]["/docker/projects/"]["post"]["responses"]["201"]["links"]
    assert project_links["postReleases"]["parameters"] == {"project_pk": "$response.body#/id"}


@pytest.mark.slow
def test_schemathesis_following_the_links_finds_no_server_error_and_no_schema_violation(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json").exclude(method="DELETE", path_regex="^/auth/tokens/")
    # Only the document's own links: schemathesis' guessed links would hide a link the document lacks.
    schema.config.phases.stateful.inference.algorithms = []
    headers = {"Authorization": f"APIToken {live.token}"}
    answered = collections.Counter()
    failures = []

    class FollowTheLinks(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": headers}

        def after_call(self, response, case):
            super().after_call(response, case)
            answered[(case.operation.method.upper(), case.operation.path, response.status_code // 100)] += 1

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            # Collected, not raised: a replay against a server whose state moved on (ids, unique names)
            # would take other branches, and Hypothesis would report that instead of the failure.
            try:
                case.validate_response(response, checks=STATEFUL_CHECKS, headers=headers, transport_kwargs=kwargs,
                                       recorder=self.recorder)
            except Exception as exc:
                failures.append(f"{case.operation.method.upper()} {case.operation.path}: {exc}")

    FollowTheLinks.run(settings=settings(max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS,
                                         deadline=None, database=None, phases=[Phase.generate],
                                         suppress_health_check=list(HealthCheck)))
    assert not failures, "\n\n".join(failures)
    # Operations on a path with parameters are reachable only through links (no guessed ids, no
    # inference): 2xx answers there prove the run followed the document's links for each resource.
    followed = {path for method, path, kind in answered if kind == 2 and "{" in path}
    for collection in ("/docker/projects/", "/docker/registries/", "/dongle/devices/"):
        assert any(path.startswith(collection + "{") for path in followed), (collection, sorted(answered.items()))
