"""A client cloudbus did not write: boto3, for the interoperability tests (tests/aws_interop.rs).

Usage (endpoint from AWS_ENDPOINT_URL, credentials and region from the environment):
  boto3_client.py sqs-send <queue-name> <messages.json>   # [{"body": str, "attributes": {k: [type, value]}}]
  boto3_client.py sqs-receive <queue-name> <count>         # prints the cloudbus view per README mapping
  boto3_client.py sns-publish <topic-name> <messages.json>
  boto3_client.py sns-subscribe-plain <topic-name> <queue-name>  # subscription WITHOUT raw delivery
Output: one JSON document on stdout.
"""
import base64
import json
import os
import sys
import time

import boto3

ENDPOINT = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")


def client(service):
    return boto3.client(service, endpoint_url=ENDPOINT)


def attributes(spec):
    out = {}
    for key, (kind, value) in spec.items():
        if kind == "Binary":
            out[key] = {"DataType": "Binary", "BinaryValue": base64.b64decode(value)}
        else:
            out[key] = {"DataType": kind, "StringValue": value}
    return out


def topic_arn(sns, name):
    return sns.create_topic(Name=name)["TopicArn"]


def sqs_send(queue, path):
    sqs = client("sqs")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    ids = []
    for m in json.load(open(path)):
        r = sqs.send_message(QueueUrl=url, MessageBody=m["body"],
                             MessageAttributes=attributes(m.get("attributes", {})))
        ids.append(r["MessageId"])
    print(json.dumps(ids))


def sqs_receive(queue, count):
    """Reads messages as a non-cloudbus consumer would, applying the README's mapping."""
    sqs = client("sqs")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    got = []
    deadline = time.time() + 60
    while len(got) < count and time.time() < deadline:
        r = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=2,
                                MessageAttributeNames=["All"])
        for m in r.get("Messages", []):
            attrs = {k: v.get("StringValue") for k, v in m.get("MessageAttributes", {}).items()}
            header = json.loads(attrs.pop("cloudbus", "{}"))
            attrs.update(header.get("attrs", {}))
            enc = header.get("enc")
            if enc == "base64":
                payload = base64.b64decode(m["Body"])
            elif enc == "empty":
                payload = b""
            else:
                payload = m["Body"].encode("utf-8")
            got.append({
                "id": header.get("id", m["MessageId"]),
                "raw_body": m["Body"],
                "payload_base64": base64.b64encode(payload).decode(),
                "attributes": attrs,
                "content_type": header.get("ct"),
            })
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    print(json.dumps(got))


def sns_publish(topic, path):
    sns = client("sns")
    arn = topic_arn(sns, topic)
    ids = []
    for m in json.load(open(path)):
        r = sns.publish(TopicArn=arn, Message=m["body"],
                        MessageAttributes=attributes(m.get("attributes", {})))
        ids.append(r["MessageId"])
    print(json.dumps(ids))


def sns_subscribe_plain(topic, queue):
    sns, sqs = client("sns"), client("sqs")
    arn = topic_arn(sns, topic)
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn)
    print(json.dumps({"topic": arn, "queue": url}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {
        "sqs-send": lambda: sqs_send(args[0], args[1]),
        "sqs-receive": lambda: sqs_receive(args[0], int(args[1])),
        "sns-publish": lambda: sns_publish(args[0], args[1]),
        "sns-subscribe-plain": lambda: sns_subscribe_plain(args[0], args[1]),
    }[command]()
