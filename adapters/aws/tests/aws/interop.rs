//! Interoperability with a client cloudbus did not write: boto3 (Python) sends what the
//! cloudbus subscriber receives intact, and reads what cloudbus publishes using only the
//! mapping the README documents. Needs LocalStack and python3 with boto3 (`scripts/test`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudbus_core::{Delivery, Message, Subscriber};

use crate::harness::endpoint;
use crate::{connect_publisher, connect_subscriber};
use serde_json::{Value, json};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", cloudbus_core::message::new_id())
}

/// Runs the boto3 helper and parses its JSON output.
fn boto3(args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/aws/boto3_client.py");
    let python = std::env::var("CLOUDBUS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .arg(&script)
        .args(args)
        .env("AWS_ENDPOINT_URL", endpoint())
        .env(
            "AWS_DEFAULT_REGION",
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        )
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        output.status.success(),
        "boto3 helper failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from the boto3 helper")
}

fn write_messages(messages: &Value) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.json", unique("boto3-messages")));
    std::fs::write(&path, messages.to_string()).expect("write messages");
    path
}

async fn receive_all(subscriber: &dyn Subscriber, count: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.len() < count && std::time::Instant::now() < deadline {
        got.extend(
            subscriber
                .receive(10, Duration::from_secs(5))
                .await
                .expect("receive"),
        );
    }
    assert_eq!(got.len(), count, "messages received");
    got
}

fn boto3_messages() -> Value {
    json!([
        {"body": "hello from boto3", "attributes": {
            "tenant": ["String", "acme"],
            "count": ["Number", "42"],
            "blob": ["Binary", BASE64.encode([0u8, 1, 255])],
        }},
        {"body": "{\"Type\": \"Notification\", \"json\": true}", "attributes": {}},
    ])
}

fn check_boto3_messages(deliveries: &[Delivery], ids: Option<&Value>) {
    let by_body: BTreeMap<String, &Delivery> = deliveries
        .iter()
        .map(|d| (d.message().text().expect("text").to_string(), d))
        .collect();
    let hello = by_body["hello from boto3"].message();
    assert_eq!(hello.attributes["tenant"], "acme");
    assert_eq!(
        hello.attributes["count"], "42",
        "Number attributes arrive as their text"
    );
    assert_eq!(
        hello.attributes["blob"],
        BASE64.encode([0u8, 1, 255]),
        "Binary as base64"
    );
    assert_eq!(hello.attributes.len(), 3);
    let json = by_body["{\"Type\": \"Notification\", \"json\": true}"].message();
    assert!(json.attributes.is_empty());
    if let Some(ids) = ids {
        let ids: Vec<&str> = ids
            .as_array()
            .expect("ids")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            ids.contains(&hello.id.as_str()),
            "the SQS MessageId is the id: {ids:?}"
        );
    }
    for d in deliveries {
        assert_eq!(d.delivery_count(), 1);
    }
}

#[tokio::test]
async fn boto3_sends_to_sqs_and_cloudbus_receives_intact() {
    let queue = unique("interop");
    let subscriber = connect_subscriber(&format!(
        "sqs://{queue}?create=true&endpoint={}",
        endpoint()
    ))
    .await;
    let ids = boto3(&[
        "sqs-send",
        &queue,
        write_messages(&boto3_messages()).to_str().unwrap(),
    ]);
    let deliveries = receive_all(subscriber.as_ref(), 2).await;
    check_boto3_messages(&deliveries, Some(&ids));
    for d in deliveries {
        d.ack().await.expect("ack");
    }
}

#[tokio::test]
async fn cloudbus_publishes_to_sqs_and_boto3_reads_by_the_readme_mapping() {
    let queue = unique("interop");
    let url = format!("sqs://{queue}?create=true&endpoint={}", endpoint());
    connect_subscriber(&url).await;
    let publisher = connect_publisher(&url).await;
    let binary: Vec<u8> = (0..=255u8).collect();
    let messages = vec![
        Message::new("héllo wörld")
            .with_attribute("tenant", "acme")
            .with_attribute("with space", "kept in the cloudbus attribute")
            .with_content_type("text/plain"),
        Message::new(binary.clone()).with_attribute("kind", "binary"),
        Message::new(""),
    ];
    for outcome in publisher.publish_batch(messages.clone()).await {
        outcome.expect("publish");
    }
    let got = boto3(&["sqs-receive", &queue, "3"]);
    let got: BTreeMap<String, &Value> = got
        .as_array()
        .expect("array")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or_default().to_string(), m))
        .collect();
    for message in &messages {
        let read = got
            .get(&message.id)
            .unwrap_or_else(|| panic!("boto3 did not read {}", message.id));
        let payload = BASE64
            .decode(read["payload_base64"].as_str().expect("payload"))
            .expect("base64");
        assert_eq!(
            payload,
            message.payload.as_ref(),
            "payload of {}",
            message.id
        );
        let attributes: BTreeMap<String, String> =
            serde_json::from_value(read["attributes"].clone()).expect("attributes");
        assert_eq!(attributes, message.attributes);
    }
    let text = got[&messages[0].id];
    assert_eq!(
        text["raw_body"], "héllo wörld",
        "UTF-8 bodies go as they are"
    );
    assert_eq!(text["content_type"], "text/plain");
    assert_eq!(
        got[&messages[1].id]["raw_body"],
        BASE64.encode(&binary),
        "binary bodies go base64-encoded"
    );
}

#[tokio::test]
async fn boto3_publishes_to_sns_and_cloudbus_receives_through_a_raw_subscription() {
    let topic = unique("interop");
    let subscriber = connect_subscriber(&format!(
        "sns://{topic}?subscription={topic}-q&create=true&endpoint={}",
        endpoint()
    ))
    .await;
    boto3(&[
        "sns-publish",
        &topic,
        write_messages(&boto3_messages()).to_str().unwrap(),
    ]);
    let deliveries = receive_all(subscriber.as_ref(), 2).await;
    check_boto3_messages(&deliveries, None);
}

#[tokio::test]
async fn an_sns_envelope_from_a_subscription_without_raw_delivery_is_unwrapped() {
    let topic = unique("interop");
    let queue = format!("{topic}-plain");
    // boto3 creates the topic and subscribes the queue without raw delivery.
    boto3(&["sns-subscribe-plain", &topic, &queue]);
    let publisher = connect_publisher(&format!("sns://{topic}?endpoint={}", endpoint())).await;
    let subscriber = connect_subscriber(&format!(
        "sns://{topic}?subscription={queue}&endpoint={}",
        endpoint()
    ))
    .await;
    let json_body = json!({"Type": "Notification", "Message": "a user's JSON"});
    let messages = vec![
        Message::new("plain text").with_attribute("tenant", "acme"),
        Message::from_json(&json_body).expect("json"),
        Message::new(vec![0u8, 159, 146, 150]),
    ];
    for message in &messages {
        publisher.publish(message.clone()).await.expect("publish");
    }
    let deliveries = receive_all(subscriber.as_ref(), 3).await;
    let by_id: BTreeMap<&str, &Delivery> = deliveries
        .iter()
        .map(|d| (d.message().id.as_str(), d))
        .collect();
    for message in &messages {
        let got = by_id
            .get(message.id.as_str())
            .unwrap_or_else(|| panic!("{} not received", message.id))
            .message();
        assert_eq!(got.payload, message.payload);
        assert_eq!(got.attributes, message.attributes);
        assert_eq!(got.content_type, message.content_type);
    }
}
