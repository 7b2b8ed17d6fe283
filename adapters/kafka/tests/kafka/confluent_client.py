"""Interop helper: the official confluent-kafka client producing and consuming the way its
own samples do. Prints JSON on stdout.

    confluent_client.py produce <brokers> <topic> <messages.json>
    confluent_client.py consume <brokers> <topic> <count>
"""

import base64
import json
import sys

from confluent_kafka import Consumer, Producer


def produce(brokers, topic, path):
    with open(path) as f:
        messages = json.load(f)
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    failures = []

    def report(error, _message):
        if error is not None:
            failures.append(str(error))

    for m in messages:
        headers = [(k, None if v is None else base64.b64decode(v)) for k, v in m.get("headers", [])]
        key = m.get("key")
        producer.produce(
            topic,
            value=base64.b64decode(m["value_base64"]),
            key=None if key is None else key.encode(),
            headers=headers,
            on_delivery=report,
        )
    producer.flush(30)
    if failures:
        sys.exit("produce failed: " + "; ".join(failures))
    print(json.dumps({"produced": len(messages)}))


def consume(brokers, topic, count):
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": "confluent-python-" + topic,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    out = []
    misses = 0
    while len(out) < count and misses < 60:
        message = consumer.poll(1.0)
        if message is None:
            misses += 1
            continue
        if message.error():
            sys.exit("consume failed: %s" % message.error())
        out.append(
            {
                "key": None if message.key() is None else message.key().decode(),
                "value_base64": base64.b64encode(message.value() or b"").decode(),
                "headers": [
                    [k, None if v is None else v.decode("utf-8", "replace")]
                    for k, v in (message.headers() or [])
                ],
                "partition": message.partition(),
            }
        )
    consumer.close()
    print(json.dumps(out))


if __name__ == "__main__":
    command, brokers, topic, arg = sys.argv[1:5]
    if command == "produce":
        produce(brokers, topic, arg)
    elif command == "consume":
        consume(brokers, topic, int(arg))
    else:
        sys.exit("unknown command " + command)
