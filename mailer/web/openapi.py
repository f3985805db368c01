"""The OpenAPI 3.1 description of the JSON API (kept true by tests/test_openapi.py)."""

from typing import Any

from mailer.domain.webhook_events import FEEDBACK_TYPE_MAX, MAX_EVENTS, STATUS_PATTERN
from mailer.domain.webhook_signature import REPLAY_WINDOW, SIGNATURE_HEADER, TIMESTAMP_HEADER
from mailer.web.webhooks import MAX_BODY

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

_EMAIL = {"type": "string", "description": "The recipient's address as the relay reports it."}
_EVENTS = {
    "type": "object",
    "required": ["events"],
    "additionalProperties": False,
    "properties": {
        "events": {
            "type": "array",
            "maxItems": MAX_EVENTS,
            "description": (
                "Validated as a whole before any event is applied; an empty list answers "
                "200 and is a way to test the signature."
            ),
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["type", "email", "bounce"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "bounce"},
                            "email": _EMAIL,
                            "bounce": {
                                "enum": ["hard", "soft"],
                                "description": (
                                    "hard: suppress now; soft: count, suppress after "
                                    "MAILER_SOFT_BOUNCE_LIMIT within MAILER_SOFT_BOUNCE_DAYS."
                                ),
                            },
                            "status": {
                                "type": ["string", "null"],
                                "pattern": STATUS_PATTERN,
                                "description": "RFC 3463 enhanced status code, e.g. 5.1.1.",
                            },
                            "diagnostic": {
                                "type": ["string", "null"],
                                "description": "The relay's diagnostic text (kept shortened).",
                            },
                        },
                    },
                    {
                        "type": "object",
                        "required": ["type", "email"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "complaint"},
                            "email": _EMAIL,
                            "feedback_type": {
                                "type": ["string", "null"],
                                "maxLength": FEEDBACK_TYPE_MAX,
                                "description": "The ARF Feedback-Type, e.g. abuse.",
                            },
                        },
                    },
                ]
            },
        }
    },
}
_RESULTS = {
    "type": "object",
    "required": ["results"],
    "additionalProperties": False,
    "properties": {
        "results": {
            "type": "array",
            "description": "One per event, in the order sent.",
            "items": {
                "type": "object",
                "required": ["applied"],
                "additionalProperties": False,
                "properties": {
                    "applied": {
                        "enum": ["suppressed", "counted", "already", "unknown"],
                        "description": (
                            "suppressed: now on the suppression list; counted: a soft bounce "
                            "below the limit; already: nothing new; unknown: an address this "
                            "instance does not hold (nothing is recorded)."
                        ),
                    }
                },
            },
        }
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
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "webhookSignature": {
                "type": "apiKey",
                "in": "header",
                "name": SIGNATURE_HEADER,
                "description": (
                    f"v1=<hex HMAC-SHA256(secret, '<{TIMESTAMP_HEADER}>.<raw body>')>; several "
                    f"comma-separated v1= values are allowed while secrets rotate. The secrets "
                    f"are MAILER_WEBHOOK_SECRETS; see docs/webhooks.md."
                ),
            },
        },
        "schemas": {
            "Error": _ERROR,
            "Events": _EVENTS,
            "Results": _RESULTS,
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
        },
        "/api/v1/events": {
            "post": {
                "operationId": "relayEvents",
                "summary": "Report bounces and complaints from a relay (signed webhook)",
                "security": [{"webhookSignature": []}],
                "parameters": [
                    {
                        "name": TIMESTAMP_HEADER,
                        "in": "header",
                        "required": True,
                        "description": (
                            f"Unix time in seconds when the request was signed; refused when "
                            f"more than {REPLAY_WINDOW} seconds from the server's clock."
                        ),
                        "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Events"}}
                    },
                },
                "responses": {
                    "200": {
                        "description": "Every event applied; what each one did.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Results"}}
                        },
                    },
                    "400": _error(
                        "The body is not JSON of the documented shape; the message names the "
                        "first bad event as events[i]. Nothing was applied."
                    ),
                    "401": _error(
                        "Signature or timestamp header missing, malformed, expired or not "
                        "matching (code bad_signature). Nothing was parsed or changed."
                    ),
                    "404": _error("Webhooks are not configured (MAILER_WEBHOOK_SECRETS unset)."),
                    "413": _error(f"The body is larger than {MAX_BODY} bytes."),
                    "422": _error(
                        "An event's address is not valid; the message names it as "
                        "events[i].email. Nothing was applied."
                    ),
                },
            }
        },
    },
}
