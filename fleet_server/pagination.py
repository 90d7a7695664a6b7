"""Limit/offset pagination with a total count, in the envelope the seed's API uses."""
from flask import request
from marshmallow import Schema, fields

from .extensions import db


def page_schema(item_schema, name):
    """A response schema `{count, next, previous, results: [item]}` for one resource."""
    return Schema.from_dict(
        {
            "count": fields.Integer(),
            "next": fields.String(allow_none=True),
            "previous": fields.String(allow_none=True),
            "results": fields.List(fields.Nested(item_schema)),
        },
        name=name,
    )


def _link(offset, limit):
    args = request.args.to_dict()
    args.update(offset=offset, limit=limit)
    query = "&".join(f"{k}={v}" for k, v in args.items())
    return f"{request.base_url}?{query}"


def paginate(statement, limit, offset):
    """Run `statement` for one page; the caller's statement must be ordered stably."""
    total = db.session.scalar(db.select(db.func.count()).select_from(statement.order_by(None).subquery()))
    items = list(db.session.scalars(statement.limit(limit).offset(offset)))
    return {
        "count": total,
        "next": _link(offset + limit, limit) if offset + limit < total else None,
        "previous": _link(max(offset - limit, 0), limit) if offset > 0 else None,
        "results": items,
    }
