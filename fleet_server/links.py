"""OpenAPI links: how the id in a 201 answer feeds the operations on what was just created.

Clients read them to find their next request; schemathesis' state machine follows them to chain
create → read/replace/change/delete sequences against the running server.
"""

CREATED_ID = "$response.body#/id"


def links_to(resource: str, path: str, methods: str, **parameters: str) -> dict:
    """One link per method in `methods` to `path` of this API, named e.g. `getProject`.

    `parameters` maps the target's path parameters to runtime expressions (`CREATED_ID`,
    `$request.path.project_pk`, ...). Targets are JSON pointers into this document, so they follow
    the routes as flask-smorest documents them.
    """
    pointer = "#/paths/" + path.replace("~", "~0").replace("/", "~1")
    return {
        f"{method}{resource}": {"operationRef": f"{pointer}/{method}", "parameters": dict(parameters)}
        for method in methods.split()
    }


def created_links(*link_groups: dict) -> dict:
    """`blp.doc` arguments adding these links to the operation's 201 answer."""
    links = {}
    for group in link_groups:
        links.update(group)
    # The int key merges into the 201 answer flask-smorest documents from `blp.response(201, ...)`.
    return {"responses": {201: {"links": links}}}
