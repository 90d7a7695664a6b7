"""Limit/offset pagination with a total count, in the envelope AutoPi's API uses."""
from urllib.parse import urlencode

from flask import current_app, request
from marshmallow import Schema, fields

from .extensions import db


def page_schema(item_schema, name):
    """A response schema `{count, next, previous, results: [item]}` for one resource."""
    return Schema.from_dict(
        {
            "count": fields.Integer(required=True, metadata={"description": "Items matching, over all pages."}),
            "next": fields.String(required=True, allow_none=True, metadata={"description": "URL of the next page: absolute under FLEET_PUBLIC_URL, else a path."}),
            "previous": fields.String(
                required=True, allow_none=True, metadata={"description": "URL of the previous page."}
            ),
            "results": fields.List(fields.Nested(item_schema), required=True),
        },
        name=name,
    )


def _link(offset, limit):
    """The URL of another page: under FLEET_PUBLIC_URL when set, else relative to this server's root.

    Never from the request's Host header, which any client writes: a forged one would make the
    answer (and any cache in front) send the next request elsewhere.
    """
    args = request.args.to_dict()
    args.update(offset=offset, limit=limit)
    base = current_app.config.get("FLEET_PUBLIC_URL") or ""
    return f"{base}{request.script_root}{request.path}?{urlencode(args)}"


def page_envelope(total, limit, offset, results):
    """The `{count, next, previous, results}` answer for one page of `total` items."""
    return {
        "count": total,
        "next": _link(offset + limit, limit) if offset + limit < total else None,
        "previous": _link(max(offset - limit, 0), limit) if offset > 0 else None,
        "results": results,
    }


def paginate(statement, limit, offset):
    """Run `statement` for one page; the caller's statement must be ordered stably (ending on a unique key)."""
    total = db.session.scalar(db.select(db.func.count()).select_from(statement.order_by(None).subquery()))
    items = list(db.session.scalars(statement.limit(limit).offset(offset)))
    return page_envelope(total, limit, offset, items)
