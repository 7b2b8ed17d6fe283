"""A client cloudbus did not write: the official azure-servicebus SDK, for
tests/servicebus_interop.rs.

  servicebus_client.py send <connection string> <queue> <messages.json>
      messages: [{"body_base64": str, "message_id": str, "content_type": str?,
                  "correlation_id": str?, "subject": str?, "properties": {k: v}}]
  servicebus_client.py receive <connection string> <queue> <count>
      prints [{"body_base64", "message_id", "content_type", "correlation_id", "subject",
               "properties"}] and completes each message
"""
import base64
import json
import sys
import time

from azure.servicebus import ServiceBusClient, ServiceBusMessage


def send(conn, queue, path):
    with ServiceBusClient.from_connection_string(conn) as client:
        with client.get_queue_sender(queue) as sender:
            for m in json.load(open(path)):
                sender.send_messages(ServiceBusMessage(
                    base64.b64decode(m["body_base64"]),
                    message_id=m["message_id"],
                    content_type=m.get("content_type"),
                    correlation_id=m.get("correlation_id"),
                    subject=m.get("subject"),
                    application_properties=m.get("properties") or None,
                ))
    print("[]")


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def receive(conn, queue, count):
    got = []
    deadline = time.monotonic() + 30
    with ServiceBusClient.from_connection_string(conn) as client:
        with client.get_queue_receiver(queue) as receiver:
            while len(got) < count and time.monotonic() < deadline:
                for m in receiver.receive_messages(max_message_count=count - len(got), max_wait_time=2):
                    body = b"".join(m.body)
                    got.append({
                        "body_base64": base64.b64encode(body).decode(),
                        "message_id": m.message_id,
                        "content_type": m.content_type,
                        "correlation_id": m.correlation_id,
                        "subject": m.subject,
                        "properties": {text(k): text(v) for k, v in (m.application_properties or {}).items()},
                    })
                    receiver.complete_message(m)
    print(json.dumps(got))


if __name__ == "__main__":
    command, conn, queue, arg = sys.argv[1:]
    if command == "send":
        send(conn, queue, arg)
    else:
        receive(conn, queue, int(arg))
