"""The OpenAPI 3.1 description of the JSON API (kept true by tests/test_openapi.py)."""

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _status(value: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status"],
                    "additionalProperties": False,
                    "properties": {"status": {"const": value}},
                }
            }
        },
    }


_COMMON_ERRORS = {
    "400": _error("The body is not a JSON object of the documented shape."),
    "401": _error("Missing, unknown or revoked API key."),
    "404": _error("No list with that slug."),
    "422": _error("The address is not valid; the message says why."),
    "429": {
        **_error(
            "Too many requests for this key (the rate is per key: a burst, then a steady rate)."
        ),
        "headers": {
            "Retry-After": {
                "description": "Seconds until the key may send again.",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "mailer API",
        "version": "1",
        "description": (
            "Opt-in and opt-out for other services. Answers never reveal whether an address "
            "is already known: every valid opt-in gets the same 202."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": _ERROR,
            "OptIn": {
                "type": "object",
                "required": ["email", "list"],
                "additionalProperties": False,
                "properties": {
                    "email": {"type": "string"},
                    "list": {"type": "string", "minLength": 1, "maxLength": 64},
                    "name": {"type": ["string", "null"], "maxLength": 200},
                    "source": {"type": ["string", "null"], "maxLength": 60},
                    "ip": {
                        "type": ["string", "null"],
                        "description": "The person's IP address (IPv4 or IPv6), kept as evidence",
                        "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}, {"type": "null"}],
                    },
                    "user_agent": {"type": ["string", "null"], "maxLength": 512},
                },
            },
            "OptOut": {
                "type": "object",
                "required": ["email"],
                "additionalProperties": False,
                "properties": {
                    "email": {"type": "string"},
                    "list": {
                        "type": ["string", "null"],
                        "description": "Omit it, or send null, to unsubscribe from every list.",
                    },
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/subscriptions": {
            "post": {
                "operationId": "optIn",
                "summary": "Record an opt-in and send a double opt-in confirmation request",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/OptIn"}}
                    },
                },
                "responses": {
                    "202": _status("pending", "Accepted; a confirmation request may be sent."),
                    **_COMMON_ERRORS,
                },
            },
            "delete": {
                "operationId": "optOut",
                "summary": "Unsubscribe an address now, from one list or from everything",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/OptOut"}}
                    },
                },
                "responses": {
                    "200": _status("unsubscribed", "Done; no further mail goes out."),
                    **_COMMON_ERRORS,
                },
            },
        }
    },
}
