"""One grammar of registry addresses: what the API accepts, the agent accepts; the rest is a 400 saying why."""
import pytest

import fleet_wire as wire
from tests.test_rest_api import assert_error

REFUSED = {
    "user:pw@registry.example:5000": "credentials",
    "https://deploy:hunter2@registry.example": "credentials",
    "https://registry.example/some/path": "path",
    "registry.example:5000/x?y=1#z": "fragment",
    "registry.example:5000?y=1": "query",
    "ftp://registry.example": "scheme",
    "registry.example:5000/../../v2": "path",
    "not a url": "registry address",
}
ACCEPTED = ["registry.example:5000", "https://registry.example", "http://127.0.0.1:5000/", "[::1]:5000",
            "registry.example"]


def _agent_accepts(url: str) -> bool:
    try:
        wire.check_registry_url(url)
    except wire.WireError:
        return False
    return True


@pytest.mark.parametrize("url, reason", REFUSED.items())
def test_a_registry_url_the_agent_would_refuse_gets_400_naming_url_and_the_reason(live, url, reason):
    body = assert_error(live.post("/docker/registries/", json={"name": "r", "url": url}), 400, "url")
    assert reason in " ".join(body["errors"]["url"])
    # A password written into the address is not repeated back.
    assert "hunter2" not in body["message"] and "hunter2" not in str(body["errors"])


@pytest.mark.parametrize("url", ACCEPTED)
def test_a_plain_registry_address_is_accepted_by_the_api_and_the_agent_alike(live, url):
    created = live.post("/docker/registries/", json={"name": "r", "url": url})
    assert created.status_code == 201, created.text
    assert _agent_accepts(created.json()["url"])


def test_the_api_and_the_agent_use_one_grammar():
    from fleet_server.registries.schemas import RegistrySchema

    for url in [*REFUSED, *ACCEPTED]:
        api_errors = RegistrySchema().validate({"name": "r", "url": url})
        assert ("url" not in api_errors) == _agent_accepts(url), url


def test_changing_a_registry_to_an_address_with_credentials_is_refused(live):
    registry = live.post("/docker/registries/", json={"name": "r", "url": "registry.example:5000"}).json()
    body = assert_error(live.patch(f"/docker/registries/{registry['id']}/", json={"url": "u:p@registry.example"}),
                        400, "url")
    assert "credentials" in body["errors"]["url"][0]
    assert live.get(f"/docker/registries/{registry['id']}/").json()["url"] == "registry.example:5000"
