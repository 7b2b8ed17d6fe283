#!/usr/bin/env python3
"""SQS + SNS smoke test against a running LocalStack (needs boto3).

Usage: python3 localstack/smoke_test.py   (endpoint from $AWS_ENDPOINT_URL,
default http://127.0.0.1:4566). Exits non-zero on failure.
"""
import json
import os
import sys
import uuid

import boto3

ENDPOINT = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
KW = dict(
    endpoint_url=ENDPOINT,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)


def main() -> int:
    sqs = boto3.client("sqs", **KW)
    sns = boto3.client("sns", **KW)
    suffix = uuid.uuid4().hex[:8]

    # SQS: create queue, send, receive, delete.
    qurl = sqs.create_queue(QueueName=f"smoke-{suffix}")["QueueUrl"]
    print("queue url:", qurl)
    sqs.send_message(QueueUrl=qurl, MessageBody="hello")
    msgs = sqs.receive_message(QueueUrl=qurl, MaxNumberOfMessages=1, WaitTimeSeconds=2).get("Messages", [])
    assert [m["Body"] for m in msgs] == ["hello"], msgs
    sqs.delete_message(QueueUrl=qurl, ReceiptHandle=msgs[0]["ReceiptHandle"])

    # SNS -> SQS fan-out with raw delivery.
    topic_arn = sns.create_topic(Name=f"smoke-{suffix}")["TopicArn"]
    qarn = sqs.get_queue_attributes(QueueUrl=qurl, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=qarn,
        Attributes={"RawMessageDelivery": "true"},
    )
    payload = json.dumps({"k": suffix})
    sns.publish(TopicArn=topic_arn, Message=payload)
    msgs = sqs.receive_message(QueueUrl=qurl, MaxNumberOfMessages=1, WaitTimeSeconds=5).get("Messages", [])
    assert [m["Body"] for m in msgs] == [payload], msgs
    print("sns -> sqs raw delivery ok:", msgs[0]["Body"])

    sns.delete_topic(TopicArn=topic_arn)
    sqs.delete_queue(QueueUrl=qurl)
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
