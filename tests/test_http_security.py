"""Every response carries security headers; cross-origin requests get no CORS grant unless configured."""
import pytest

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@pytest.mark.parametrize("method, path, authenticated", [
    ("GET", "/health", False),
    ("GET", "/docker/projects/", True),
    ("GET", "/docker/projects/", False),          # 401
    ("GET", "/docker/projects/999/", True),       # 404
    ("POST", "/docker/projects/", True),          # 400, no body
    ("GET", "/no/such/path", False),              # 404 outside every blueprint
    ("GET", "/api/openapi.json", False),
    ("POST", "/dongle/register/", False),         # 400
])
def test_every_response_carries_the_security_headers(client, auth, method, path, authenticated):
    response = client.open(path, method=method, headers=auth if authenticated else {})
    for name, value in HEADERS.items():
        assert response.headers.get(name) == value, (name, response.status_code)
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_a_cross_origin_request_gets_no_cors_grant_by_default(client, auth):
    response = client.get("/docker/projects/", headers={**auth, "Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options("/docker/projects/", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization"})
    assert not any(name.lower().startswith("access-control-allow") for name in preflight.headers.keys())


def test_an_origin_listed_in_the_configuration_is_granted_and_others_are_not(app, client, auth):
    app.config["FLEET_CORS_ORIGINS"] = "https://dashboard.example, https://ops.example"
    granted = client.get("/docker/projects/", headers={**auth, "Origin": "https://dashboard.example"})
    assert granted.headers["Access-Control-Allow-Origin"] == "https://dashboard.example"
    assert "Origin" in granted.headers["Vary"]
    refused = client.get("/docker/projects/", headers={**auth, "Origin": "https://dashboard.example.evil"})
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_hsts_is_sent_over_https(client):
    response = client.get("/health", base_url="https://fleet.example")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
