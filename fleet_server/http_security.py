"""Security headers on every response, and CORS closed unless origins are listed in FLEET_CORS_ORIGINS."""
from flask import current_app, request

# The API serves JSON only: nothing on it may be framed, run scripts, or be sniffed into HTML.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    # Responses carry tokens, device identities and broker passwords: no cache may keep them.
    "Cache-Control": "no-store",
}
HSTS = "max-age=31536000; includeSubDomains"
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


def allowed_origins(config) -> frozenset[str]:
    raw = config.get("FLEET_CORS_ORIGINS") or ""
    return frozenset(origin.strip().rstrip("/") for origin in raw.split(",") if origin.strip())


def add_security_headers(response):
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    # Whatever a view set, cross-origin access is decided here alone.
    for name in [n for n in response.headers.keys() if n.lower().startswith("access-control-")]:
        del response.headers[name]
    origin = request.headers.get("Origin")
    if origin:
        response.vary.add("Origin")
        if origin.rstrip("/") in allowed_origins(current_app.config):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
    return response


def register_security_headers(app):
    app.after_request(add_security_headers)
