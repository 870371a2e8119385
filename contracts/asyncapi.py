"""AsyncAPI 3.0 description of eglo's AMQP interface, generated from the message contracts.

The payload schemas come from `contracts.schemas.render_schemas()`, so the document cannot drift
from the JSON Schemas teams already generate clients from. `render_asyncapi()` is deterministic:
a test compares it with the committed `docs/asyncapi.yaml`.

The YAML is written by a small emitter here rather than PyYAML, so that `eglo asyncapi` needs no
extra runtime dependency; every string that is not trivially plain is double-quoted with
JSON-compatible escapes, which YAML 1.1 and 1.2 parsers read back identically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from contracts.requests import SCHEMA_VERSION
from contracts.rules import rules_document
from contracts.schemas import render_schemas
from contracts.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELAY_QUEUE_ARGUMENTS,
    DELIVERY_LIMIT,
    EVENTS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
)
from contracts.vocabulary import DEAD_LETTER_REASONS, REQUEST_TYPES, RUN_STATUSES, SEVERITIES

AMQP_BINDING_VERSION = "0.3.0"
COMPONENT_REF = "#/components/schemas/"

# Which rendered JSON Schema documents which message. The anomaly event is listed before its
# contract exists so the channel is documented now; see `_payload_schema`.
MESSAGE_SCHEMAS = {
    "OptimizationRequest": "request.v1.json",
    "RunOutcome": "event.run-outcome.v1.json",
    "EmbeddingRequested": "event.embedding-requested.v1.json",
    "AnomalyDetected": "event.anomaly-detected.v1.json",
    "RequestDeadLettered": "event.request-dead-lettered.v1.json",
}


def _hoist(name: str, schema: dict[str, Any], into: dict[str, Any]) -> None:
    """Move a standalone JSON Schema and its `$defs` into components.schemas.

    Pydantic's `#/$defs/X` refs are relative to the schema file; inside the AsyncAPI document they
    must point at `#/components/schemas/X`. `$id`/`$schema` are dropped because an embedded `$id`
    would change the base URI that those refs resolve against.
    """
    defs: dict[str, Any] = schema.pop("$defs", {})
    schema.pop("$id", None)
    schema.pop("$schema", None)
    renames = {def_name: def_name for def_name in defs}
    for def_name, definition in defs.items():
        if def_name in into and into[def_name] != _rewrite(definition, renames):
            # Same model name, different shape (e.g. validation vs serialization mode).
            renames[def_name] = f"{name}_{def_name}"
    for def_name, definition in defs.items():
        into[renames[def_name]] = _rewrite(definition, renames)
    into[name] = _rewrite(schema, renames)


def _rewrite(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out[key] = _rewrite(value, renames)
        return out
    if isinstance(node, list):
        return [_rewrite(item, renames) for item in node]
    if isinstance(node, str) and node.startswith("#/$defs/"):
        return COMPONENT_REF + renames[node.removeprefix("#/$defs/")]
    return node


def _payload_schema(name: str, rendered: dict[str, str], schemas: dict[str, Any]) -> None:
    file_name = MESSAGE_SCHEMAS[name]
    if file_name in rendered:
        _hoist(name, json.loads(rendered[file_name]), schemas)
        return
    schemas[name] = {
        "type": "object",
        "description": (
            f"Not yet published as a contract: contracts.schemas has no {file_name!r}. "
            "Regenerate this document once it does."
        ),
    }


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(parts)}


def _exchange_binding(exchange: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": exchange,
                "type": "topic",
                "durable": True,
                "autoDelete": False,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _queue_binding(queue: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {
                "name": queue,
                "durable": True,
                "exclusive": False,
                "autoDelete": False,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


REQUEST_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "Producers set no headers; AMQP properties carry the metadata.",
    "properties": {
        "x-eglo-attempt": {
            "type": "integer",
            "minimum": 0,
            "description": (
                "Set by workers on copies re-queued through a delay queue: delay-queue round "
                "trips so far, an AMQP long-long (64-bit signed, type octet `l`). Producers "
                "leave it unset."
            ),
        },
        "x-eglo-published-at": _string(
            "Optional: when the producer published, RFC 3339 with an offset, to the millisecond "
            "(latency metrics; without it the AMQP timestamp property is used).",
            format="date-time",
        ),
    },
}

DEAD_LETTER_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": ["x-eglo-dead-letter-reason", "x-eglo-original-routing-key"],
    "properties": {
        "x-eglo-dead-letter-reason": _string(
            "Stable machine-readable code of why the request can never become a run.",
            examples=list(DEAD_LETTER_REASONS),
        ),
        "x-eglo-dead-letter-detail": _string(
            "Human-readable detail (validation errors, the last QNN error), at most 1000 chars; "
            "names the broken rule as `(rule <id>)` when a rule is why.",
            maxLength=1000,
        ),
        "x-eglo-dead-letter-rule": _string(
            "Set with reason invalid_request when a cross-field rule is why: the rule's id "
            "from x-eglo-rules (docs/schemas/request.rules.v1.json).",
        ),
        "x-eglo-original-expiration": _string(
            "The original expiration property (ms), which the copy does not carry (it would "
            "expire the dead letter).",
        ),
        "x-eglo-original-user-id": _string(
            "The original user_id property, which the copy does not carry (the broker refuses "
            "a user_id other than the publishing connection's user).",
        ),
        "x-eglo-original-routing-key": _string(
            "Routing key of the original publish, e.g. request.forecast; replay with it.",
        ),
        "x-eglo-republished-at": _string(
            "When the worker dead-lettered the copy.", format="date-time"
        ),
        "x-eglo-attempt": {
            "type": "integer",
            "minimum": 0,
            "description": "Delay-queue round trips the request had made.",
        },
        "x-death": {
            "type": "array",
            "description": (
                "Added by the broker, instead of the x-eglo-* headers, when the broker itself "
                f"dead-lettered the original from {REQUESTS_QUEUE}: reason `delivery_limit` after "
                f"{DELIVERY_LIMIT} deliveries that crashed workers, or `rejected` when a worker "
                "could not publish its own copy (eglo_settle_fallbacks_total counts those; the "
                "worker logs request.copy_failed with the reason it had). Each entry has queue, "
                "reason, count, time, exchange and routing-keys."
            ),
        },
    },
    "description": (
        "Every other header and property of the original is kept exactly, with its AMQP type "
        "(64-bit doubles stay doubles, integers keep their width, timestamps their raw value, "
        "nested tables and byte arrays as sent). eglo's own headers are long strings, and "
        "x-eglo-attempt a long-long."
    ),
}

EVENT_PROPERTIES = (
    "AMQP properties: content_type application/json, delivery_mode 2 (persistent), "
    "message_id = event_id (deduplicate on it), type = event_type, timestamp = when the worker "
    "published it (whole seconds)."
)


def _message(
    name: str,
    title: str,
    summary: str,
    *,
    headers: dict[str, Any] | None,
    payload: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
    }
    if headers is not None:
        message["headers"] = headers
    message["payload"] = payload
    message.update(extra or {})
    return message


def _messages() -> dict[str, Any]:
    schema = COMPONENT_REF
    return {
        "OptimizationRequest": _message(
            "OptimizationRequest",
            "Optimization request",
            "One forecast, storage, grid_switch or simulation request (schema_version 1). "
            "AMQP properties: content_type application/json (any JSON media type: "
            "application/json, text/json or */*+json, parameters allowed, charset UTF-8 only; "
            "or unset), delivery_mode 2 (persistent), message_id = request_id, optional reply_to "
            "+ correlation_id for a direct reply. The routing key's <type> must equal the "
            "body's request_type. Types are exact: no number in a string, no boolean for a "
            "number, dates as YYYY-MM-DD, instants as RFC 3339 with an offset, optional fields "
            "left out rather than null. Beyond the schema, the rules in x-eglo-rules apply.",
            headers=REQUEST_HEADERS,
            payload={"$ref": schema + "OptimizationRequest"},
            extra={"x-eglo-rules": rules_document()["rules"]},
        ),
        "DeadLetteredRequest": _message(
            "DeadLetteredRequest",
            "Dead-lettered request",
            "The original request body byte for byte (possibly not valid JSON), with the "
            "original AMQP properties and the reason in headers.",
            headers=DEAD_LETTER_HEADERS,
            payload={
                "description": "Unchanged original body; valid OptimizationRequest JSON "
                "unless the reason says otherwise."
            },
        ),
        "RunOutcome": _message(
            "RunOutcome",
            "Run outcome",
            "A request's terminal outcome, emitted once per run via the transactional outbox. "
            + EVENT_PROPERTIES
            + " Sent as a reply too, with the request's correlation_id.",
            headers=None,
            payload={"$ref": schema + "RunOutcome"},
        ),
        "EmbeddingRequested": _message(
            "EmbeddingRequested",
            "Embedding requested",
            "A completed run whose scenario the embedder should embed. " + EVENT_PROPERTIES,
            headers=None,
            payload={"$ref": schema + "EmbeddingRequested"},
        ),
        "AnomalyDetected": _message(
            "AnomalyDetected",
            "Anomaly detected",
            "An anomaly eglo's checks noticed in a completed run, emitted with its outcome. "
            + EVENT_PROPERTIES,
            headers=None,
            payload={"$ref": schema + "AnomalyDetected"},
        ),
        "RequestDeadLettered": _message(
            "RequestDeadLettered",
            "Request dead-lettered (reply)",
            "The reply to a request with reply_to that was dead-lettered instead of becoming "
            "a run: reason, rule and detail as in the dead letter's headers. "
            + EVENT_PROPERTIES
            + " correlation_id = the request's.",
            headers=None,
            payload={"$ref": schema + "RequestDeadLettered"},
        ),
    }


def _channels() -> dict[str, Any]:
    def msg(name: str) -> dict[str, Any]:
        return _ref("components", "messages", name)

    return {
        "requests": {
            "address": "request.{request_type}",
            "title": "Optimization requests (publish side)",
            "description": (
                f"Producers publish to the `{REQUESTS_EXCHANGE}` topic exchange with "
                "mandatory=true and publisher confirms; the exchange routes `request.*` to the "
                f"`{REQUESTS_QUEUE}` quorum queue."
            ),
            "parameters": {
                "request_type": {
                    "enum": list(REQUEST_TYPES),
                    "description": "Equal to the payload's request_type.",
                }
            },
            "messages": {"optimizationRequest": msg("OptimizationRequest")},
            "bindings": _exchange_binding(REQUESTS_EXCHANGE),
        },
        "requestsQueue": {
            "address": REQUESTS_QUEUE,
            "title": "Optimization requests (worker side)",
            "description": (
                f"Quorum queue bound to `{REQUESTS_EXCHANGE}` with `request.*`; workers consume "
                "with manual acks and ack only after the run is committed. Queue arguments: "
                f"x-queue-type=quorum, x-dead-letter-exchange={DEAD_LETTER_EXCHANGE}, "
                f"x-delivery-limit={DELIVERY_LIMIT}."
            ),
            "messages": {"optimizationRequest": msg("OptimizationRequest")},
            "bindings": _queue_binding(REQUESTS_QUEUE),
            "x-eglo-queue-arguments": {
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
        },
        "retryDelay": {
            "address": "eglo.requests.retry.{delay_ms}ms",
            "title": "Retry delay queues",
            "description": (
                "Quorum queues with a message TTL, one per EGLO_RETRY_DELAYS_S tier, replicated "
                "like eglo.requests so a tier survives the loss of a node; expired messages "
                f"dead-letter (at-least-once) through the default exchange back onto "
                f"`{REQUESTS_QUEUE}`. Until issue 13 the tiers were classic queues named "
                "`eglo.requests.delay.{delay_ms}ms`."
            ),
            "parameters": {"delay_ms": {"description": "The tier's delay in milliseconds."}},
            "messages": {"optimizationRequest": msg("OptimizationRequest")},
            "bindings": _queue_binding("eglo.requests.retry.{delay_ms}ms"),
            "x-eglo-queue-arguments": {
                "x-message-ttl": "{delay_ms}",
                **DELAY_QUEUE_ARGUMENTS,
            },
        },
        "deadLetters": {
            "address": DEAD_LETTER_QUEUE,
            "title": "Dead-lettered requests",
            "description": (
                f"Quorum queue bound to the `{DEAD_LETTER_EXCHANGE}` fanout exchange. Nothing "
                "consumes it automatically: operators inspect and replay (docs/runbook.md)."
            ),
            "messages": {"deadLetteredRequest": msg("DeadLetteredRequest")},
            "bindings": _queue_binding(DEAD_LETTER_QUEUE),
            "x-eglo-queue-arguments": {"x-queue-type": "quorum"},
        },
        "runOutcomes": {
            "address": "run.{status}.{request_type}",
            "title": "Run outcomes",
            "description": f"Published on the `{EVENTS_EXCHANGE}` topic exchange.",
            "parameters": {
                "status": {"enum": list(RUN_STATUSES), "description": "The run's status."},
                "request_type": {"enum": list(REQUEST_TYPES), "description": "The request type."},
            },
            "messages": {"runOutcome": msg("RunOutcome")},
            "bindings": _exchange_binding(EVENTS_EXCHANGE),
        },
        "replies": {
            "address": None,
            "title": "Direct replies",
            "description": (
                "Exactly one reply per request that sets the AMQP reply_to property (a property, "
                "not a header), through the default exchange to that queue, with the request's "
                "correlation_id: the RunOutcome when a run is stored (completed, failed, "
                "expired), the stored run's RunOutcome again for a re-sent request_id, and "
                "RequestDeadLettered when the request is dead-lettered. A redelivered request "
                "can repeat a reply with the same message_id: drop repeats."
            ),
            "messages": {
                "runOutcome": msg("RunOutcome"),
                "requestDeadLettered": msg("RequestDeadLettered"),
            },
        },
        "embeddingRequested": {
            "address": "embedding.requested",
            "title": "Embedding requests",
            "description": f"Published on `{EVENTS_EXCHANGE}` for every completed run.",
            "messages": {"embeddingRequested": msg("EmbeddingRequested")},
            "bindings": _exchange_binding(EVENTS_EXCHANGE),
        },
        "anomalyDetected": {
            "address": "anomaly.detected.{severity}",
            "title": "Anomalies",
            "description": f"Published on `{EVENTS_EXCHANGE}`; bind `anomaly.detected.#`.",
            "parameters": {
                "severity": {"enum": list(SEVERITIES), "description": "The anomaly's severity."}
            },
            "messages": {"anomalyDetected": msg("AnomalyDetected")},
            "bindings": _exchange_binding(EVENTS_EXCHANGE),
        },
    }


def _operation(
    action: str, channel: str, message: str, summary: str, amqp: dict[str, Any]
) -> dict[str, Any]:
    return {
        "action": action,
        "channel": _ref("channels", channel),
        "summary": summary,
        "messages": [_ref("channels", channel, "messages", message)],
        "bindings": {"amqp": {**amqp, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _operations() -> dict[str, Any]:
    persistent = {"deliveryMode": 2, "timestamp": True}
    publish_request = _operation(
        "send",
        "requests",
        "optimizationRequest",
        "Producers submit a request; wait for the publisher confirm before forgetting it.",
        {**persistent, "mandatory": True},
    )
    # No `address`: AsyncAPI's runtime expressions reach headers and payload, not the AMQP
    # reply_to property, which is where the reply goes (see the replies channel).
    publish_request["reply"] = {
        "channel": _ref("channels", "replies"),
        "messages": [
            _ref("channels", "replies", "messages", "runOutcome"),
            _ref("channels", "replies", "messages", "requestDeadLettered"),
        ],
    }
    return {
        "publishRequest": publish_request,
        "consumeRequest": _operation(
            "receive",
            "requestsQueue",
            "optimizationRequest",
            "Workers consume with prefetch EGLO_PREFETCH and ack after commit.",
            {"ack": True},
        ),
        "delayRequest": _operation(
            "send",
            "retryDelay",
            "optimizationRequest",
            "Workers park a request whose QNN calls failed transiently, then ack the original.",
            persistent,
        ),
        "inspectDeadLetters": _operation(
            "receive",
            "deadLetters",
            "deadLetteredRequest",
            "Operators read (and replay) requests that can never become runs.",
            {"ack": True},
        ),
        "emitRunOutcome": _operation(
            "send",
            "runOutcomes",
            "runOutcome",
            "Workers relay each run's outcome from the outbox after commit (at least once).",
            persistent,
        ),
        "replyRunOutcome": _operation(
            "send",
            "replies",
            "runOutcome",
            "Workers send the outcome to the request's reply_to queue.",
            persistent,
        ),
        "replyRequestDeadLettered": _operation(
            "send",
            "replies",
            "requestDeadLettered",
            "Workers tell the request's reply_to queue that the request was dead-lettered.",
            persistent,
        ),
        "emitEmbeddingRequested": _operation(
            "send",
            "embeddingRequested",
            "embeddingRequested",
            "Workers ask the embedder to embed a completed run.",
            persistent,
        ),
        "emitAnomalyDetected": _operation(
            "send",
            "anomalyDetected",
            "anomalyDetected",
            "An anomaly was detected or synced.",
            persistent,
        ),
    }


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as plain data."""
    rendered = render_schemas()
    schemas: dict[str, Any] = {}
    for name in MESSAGE_SCHEMAS:
        _payload_schema(name, rendered, schemas)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "eglo: Energy Grid Load Optimizer",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                "Optimization requests in, run outcomes and follow-up events out, over RabbitMQ "
                "(AMQP 0-9-1). Generated by `eglo asyncapi` from the contracts package; the JSON "
                "Schemas in docs/schemas/ describe the same payloads. Consumers must tolerate "
                "redelivery: deduplicate events on event_id."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "The broker of `deploy/docker-compose.yml` or a developer machine.",
            }
        },
        "channels": _channels(),
        "operations": _operations(),
        "components": {"messages": _messages(), "schemas": schemas},
    }


# ---- YAML emitter -------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
# Words YAML 1.1 or 1.2 read as booleans or null when plain.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _quote(text: str) -> str:
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029, 0xFEFF):
            # YAML treats these as line breaks or non-printable: keep them escaped.
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if text in ("inf", "-inf", "nan"):
            return {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}[text]
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa:
            # PyYAML (YAML 1.1) reads 1e-05 as a string; 1.0e-05 as a float.
            mantissa += ".0"
        return mantissa + ("e" + exponent if exponent else "")
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return _quote(value)
    raise TypeError(f"cannot render {type(value).__name__} as YAML")


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        lines = []
        for key, item in value.items():
            head = pad + _scalar(str(key)) + ":"
            if isinstance(item, dict | list) and item:
                lines.append(head)
                lines.extend(_lines(item, indent + 2))
            else:
                lines.append(head + " " + _flow(item))
        return lines
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        lines = []
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = _lines(item, indent + 2)
                lines.append(pad + "- " + nested[0][indent + 2 :])
                lines.extend(nested[1:])
            else:
                lines.append(pad + "- " + _flow(item))
        return lines
    return [pad + _scalar(value)]


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(data: Any) -> str:
    """Block-style YAML for JSON-like data; keys keep their insertion order."""
    return "\n".join(_lines(data, 0)) + "\n"


HEADER = "# Generated by `eglo asyncapi` from contracts/: do not edit by hand.\n"


def render_asyncapi() -> str:
    """The AsyncAPI document as YAML text, identical on every run for the same contracts."""
    return HEADER + to_yaml(asyncapi_document())


def write_asyncapi(path: Path) -> Path:
    """Write the document to `path` (the CLI's `eglo asyncapi --out`), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_asyncapi(), encoding="utf-8")
    return path
