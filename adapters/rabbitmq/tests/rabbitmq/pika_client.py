"""Interop helper: pika, the Python client of RabbitMQ's own tutorials, publishing (with
publisher confirms) and consuming the way its documentation does. Prints JSON on stdout.

    pika_client.py publish <amqp url> <queue> <messages.json>
    pika_client.py consume <amqp url> <queue> <count>

messages.json is a list of {"properties": {...}, "headers": {...}, "body_base64": "..."}.
Header values are JSON (strings, integers, booleans, null, lists, objects), except the
tagged objects {"$bytes": base64}, {"$decimal": "12.50"} and {"$timestamp": unix seconds},
which become bytes, decimal.Decimal and datetime, so that pika sends each AMQP type.

consume prints, per message, its properties, its headers as [python type, value] (bytes
base64), and its body base64, acking each.
"""

import base64
import datetime
import decimal
import json
import sys

import pika


def typed(value):
    """JSON with tags to the Python values pika encodes as the AMQP field types."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        if set(value) == {"$decimal"}:
            return decimal.Decimal(value["$decimal"])
        if set(value) == {"$timestamp"}:
            return datetime.datetime.fromtimestamp(value["$timestamp"], datetime.timezone.utc)
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return value


def publish(url, queue, path):
    with open(path) as f:
        messages = json.load(f)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    for m in messages:
        properties = pika.BasicProperties(
            headers=typed(m.get("headers")) if "headers" in m else None,
            **m.get("properties", {}),
        )
        # With confirms on, basic_publish returns once the broker confirmed the message and
        # raises UnroutableError or NackError when it did not take it.
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=base64.b64decode(m["body_base64"]),
            properties=properties,
            mandatory=True,
        )
    connection.close()
    print(json.dumps({"published": len(messages)}))


def shown(value):
    """A received header value as [python type name, JSON value]."""
    if isinstance(value, bytes):
        return ["bytes", base64.b64encode(value).decode()]
    if isinstance(value, (decimal.Decimal, datetime.datetime)):
        return [type(value).__name__, str(value)]
    if isinstance(value, dict):
        return ["dict", {k: shown(v) for k, v in value.items()}]
    if isinstance(value, list):
        return ["list", [shown(v) for v in value]]
    return [type(value).__name__, value]


def consume(url, queue, count):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=count)
    out = []
    idle = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=1):
        if method is None:
            idle += 1
            if idle >= 60:
                break
            continue
        out.append(
            {
                "properties": {
                    "message_id": properties.message_id,
                    "content_type": properties.content_type,
                    "correlation_id": properties.correlation_id,
                    "type": properties.type,
                    "delivery_mode": properties.delivery_mode,
                    "timestamp": properties.timestamp,
                    "expiration": properties.expiration,
                },
                "headers": {k: shown(v) for k, v in (properties.headers or {}).items()},
                "body_base64": base64.b64encode(body).decode(),
                "redelivered": method.redelivered,
            }
        )
        channel.basic_ack(method.delivery_tag)
        if len(out) >= count:
            break
    channel.cancel()
    connection.close()
    print(json.dumps(out))


if __name__ == "__main__":
    command, url, queue, arg = sys.argv[1:5]
    if command == "publish":
        publish(url, queue, arg)
    elif command == "consume":
        consume(url, queue, int(arg))
    else:
        sys.exit("unknown command " + command)
