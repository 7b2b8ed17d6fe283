//! Interoperability with a client cloudbus did not write: pika (the Python client of
//! RabbitMQ's tutorials) publishes, with publisher confirms, messages with properties and
//! headers of every AMQP type pika sends, which cloudbus receives in the text forms the
//! mapping documents; and pika reads what cloudbus publishes using only that mapping. Needs
//! its venv: `scripts/python-venv adapters/rabbitmq/tests/rabbitmq/requirements.txt
//! target/rabbitmq-py-venv` (or CLOUDBUS_TEST_RABBITMQ_PYTHON naming another python).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudbus_core::{Delivery, Message, Publisher, Subscriber};
use cloudbus_rabbitmq::{DEFAULT_URI, RabbitMqPublisher, RabbitMqSubscriber, URI_ENV};
use serde_json::{Value, json};

use crate::harness::config;

const PATIENCE: Duration = Duration::from_secs(60);

fn python() -> String {
    std::env::var("CLOUDBUS_TEST_RABBITMQ_PYTHON").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../target/rabbitmq-py-venv/bin/python"
        )
        .into()
    })
}

/// The broker's URI, as the adapter finds it (`RABBITMQ_URL`).
fn server() -> String {
    std::env::var(URI_ENV).unwrap_or_else(|_| DEFAULT_URI.to_string())
}

/// Runs the pika helper and parses its JSON output.
fn pika(args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/rabbitmq/pika_client.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (make the venv with scripts/python-venv \
                 adapters/rabbitmq/tests/rabbitmq/requirements.txt target/rabbitmq-py-venv, \
                 or set CLOUDBUS_TEST_RABBITMQ_PYTHON)",
                python()
            )
        });
    assert!(
        output.status.success(),
        "pika helper failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from the pika helper")
}

/// 2024-05-06T07:08:09Z.
const WHEN: u64 = 1_714_979_289;

async fn receive(subscriber: &RabbitMqSubscriber, count: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while got.len() < count && Instant::now() < deadline {
        got.extend(
            subscriber
                .receive(10, Duration::from_secs(1))
                .await
                .expect("receive"),
        );
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_publishes_and_cloudbus_receives_intact() {
    let queue = format!("cb-pika-in-{}", cloudbus_core::message::new_id());
    let mut created = config(&queue);
    created.create = true;
    // Declares the queue (a quorum queue) before pika publishes to it.
    let subscriber = RabbitMqSubscriber::connect(&created)
        .await
        .expect("subscribe");
    let binary: Vec<u8> = (0..=255u8).collect();
    let sent = json!([
        {
            "properties": {
                "message_id": "pika-1",
                "content_type": "application/octet-stream",
                "correlation_id": "corr-7",
                "type": "invoice.created",
            },
            "headers": {
                "tenant": "acme",
                "city": "Zürich",
                "empty": "",
                "count": 42,
                "delta": -7,
                "big": 1_099_511_627_776u64,
                "urgent": true,
                "archived": false,
                "raw": {"$bytes": BASE64.encode([0xffu8, 0x00, 0x10])},
                "utf8-bytes": {"$bytes": BASE64.encode("plain")},
                "price": {"$decimal": "12.75"},
                "tiny": {"$decimal": "0.005"},
                "whole": {"$decimal": "100"},
                "loss": {"$decimal": "-1.5"},
                "debt": {"$decimal": "-0.005"},
                "at": {"$timestamp": WHEN},
                "meta": {
                    "a": 1,
                    "b": "two",
                    "c": {"d": true},
                    "e": {"$decimal": "1.25"},
                    "f": {"$timestamp": WHEN},
                    "g": {"$bytes": BASE64.encode([0xffu8])},
                },
                "tags": ["x", 2, false, null, {"$bytes": BASE64.encode([0xffu8])}],
                "nothing": null,
            },
            "body_base64": BASE64.encode(&binary),
        },
        {
            "properties": {"content_type": "text/plain"},
            "body_base64": BASE64.encode("no id from pika"),
        },
    ]);
    let path = std::env::temp_dir().join(format!("{queue}.json"));
    std::fs::write(&path, sent.to_string()).expect("write");
    let published = pika(&["publish", &server(), &queue, path.to_str().expect("path")]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(published["published"], 2, "{published}");

    let got = receive(&subscriber, 2).await;
    assert_eq!(got.len(), 2, "both messages pika published");
    let (full, bare): (Vec<Delivery>, Vec<Delivery>) =
        got.into_iter().partition(|d| d.message().id == "pika-1");
    let (full, bare) = (
        full.into_iter().next().expect("the message with an id"),
        bare.into_iter().next().expect("the message without one"),
    );

    let message = full.message();
    assert_eq!(
        message.payload.as_ref(),
        binary.as_slice(),
        "the body is the payload, byte-exact"
    );
    assert_eq!(
        message.content_type.as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(message.correlation_id.as_deref(), Some("corr-7"));
    assert_eq!(
        message.subject.as_deref(),
        Some("invoice.created"),
        "the subject is `type`"
    );
    let expected: BTreeMap<&str, &str> = [
        ("tenant", "acme"),
        ("city", "Zürich"),
        ("empty", ""),
        // pika sends integers as 32-bit (`I`) or, beyond, 64-bit (`l`) signed integers.
        ("count", "42"),
        ("delta", "-7"),
        ("big", "1099511627776"),
        ("urgent", "true"),
        ("archived", "false"),
        // pika sends bytes as byte arrays (`x`): base64, UTF-8 or not.
        ("raw", "/wAQ"),
        ("utf8-bytes", "cGxhaW4="),
        // Decimals with their scale (pika normalizes them: 12.50 would go as 12.5).
        ("price", "12.75"),
        ("tiny", "0.005"),
        ("whole", "100"),
        // The grammar of AMQP 0-9-1 makes a decimal's value unsigned; pika (like the Java
        // client and amqp091-go) writes it as a signed 32-bit integer.
        ("loss", "-1.5"),
        ("debt", "-0.005"),
        ("at", "2024-05-06T07:08:09Z"),
        (
            "meta",
            r#"{"a":1,"b":"two","c":{"d":true},"e":"1.25","f":"2024-05-06T07:08:09Z","g":"/w=="}"#,
        ),
        ("tags", r#"["x",2,false,null,"/w=="]"#),
        ("nothing", ""),
    ]
    .into_iter()
    .collect();
    for (key, text) in &expected {
        assert_eq!(
            message.attributes.get(*key).map(String::as_str),
            Some(*text),
            "header {key}"
        );
    }
    assert_eq!(
        message.attributes.len(),
        expected.len(),
        "every header is an attribute, and nothing else is: {:?}",
        message.attributes
    );
    assert_eq!(full.delivery_count(), 1);

    // A message without message_id gets an id from its content, the same at every delivery.
    let id = bare.message().id.clone();
    assert!(!id.is_empty(), "a message without message_id gets an id");
    assert_eq!(bare.message().text(), Some("no id from pika"));
    assert_eq!(bare.message().content_type.as_deref(), Some("text/plain"));
    assert!(bare.message().attributes.is_empty());
    bare.nack(Duration::ZERO).await.expect("nack");
    let again = receive(&subscriber, 1).await;
    assert_eq!(again.len(), 1, "the nacked message comes back");
    assert_eq!(
        again[0].message().id,
        id,
        "the id of a message without message_id is stable"
    );
    assert_eq!(again[0].delivery_count(), 2);
    for delivery in again.into_iter().chain([full]) {
        delivery.ack().await.expect("ack");
    }
    subscriber.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudbus_publishes_and_pika_reads_by_the_documented_mapping() {
    let queue = format!("cb-pika-out-{}", cloudbus_core::message::new_id());
    let mut target = config(&queue);
    target.create = true;
    let publisher = RabbitMqPublisher::connect(&target).await.expect("connect");
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    let messages = vec![
        Message::new("héllo")
            .with_attribute("tenant", "acme")
            .with_attribute("city", "Zürich")
            .with_attribute("empty", "")
            .with_content_type("text/plain; charset=utf-8")
            .with_correlation_id("corr-1")
            .with_subject("greeting"),
        Message::new(binary.clone())
            .with_attribute("kind", "binary")
            .with_content_type("application/octet-stream"),
        Message::new("short-lived").with_time_to_live(Duration::from_secs(60)),
    ];
    let before = SystemTime::now();
    for message in &messages {
        publisher.publish(message.clone()).await.expect("publish");
    }
    let after = SystemTime::now();
    publisher.close().await.expect("close");

    let read = pika(&["consume", &server(), &queue, "3"]);
    let read = read.as_array().expect("array");
    assert_eq!(read.len(), 3, "pika read every message: {read:?}");
    let seconds = |at: SystemTime| at.duration_since(UNIX_EPOCH).expect("now").as_secs();
    for message in &messages {
        let record = read
            .iter()
            .find(|r| r["properties"]["message_id"].as_str() == Some(message.id.as_str()))
            .unwrap_or_else(|| panic!("pika did not read {} (message_id)", message.id));
        let properties = &record["properties"];
        let body = BASE64
            .decode(record["body_base64"].as_str().expect("body"))
            .expect("base64");
        assert_eq!(
            body,
            message.payload.as_ref(),
            "the body is the payload, byte-exact"
        );
        assert_eq!(
            properties["content_type"].as_str(),
            message.content_type.as_deref()
        );
        assert_eq!(
            properties["correlation_id"].as_str(),
            message.correlation_id.as_deref()
        );
        assert_eq!(
            properties["type"].as_str(),
            message.subject.as_deref(),
            "the subject is `type`"
        );
        assert_eq!(properties["delivery_mode"], 2, "persistent");
        let timestamp = properties["timestamp"].as_u64().expect("a timestamp");
        assert!(
            (seconds(before)..=seconds(after)).contains(&timestamp),
            "the publish time in whole seconds: {timestamp}"
        );
        let mut headers: BTreeMap<String, Value> = record["headers"]
            .as_object()
            .expect("headers")
            .clone()
            .into_iter()
            .collect();
        match message.time_to_live {
            Some(ttl) => {
                assert_eq!(
                    properties["expiration"].as_str(),
                    Some(ttl.as_millis().to_string().as_str()),
                    "the time to live is `expiration`, in milliseconds"
                );
                let expires_at = headers
                    .remove("cloudbus-expires-at")
                    .expect("the header cloudbus-expires-at");
                assert_eq!(expires_at[0], "str", "{expires_at}");
                let millis: u128 = expires_at[1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("unix milliseconds");
                let window = (before + ttl).duration_since(UNIX_EPOCH).expect("now")
                    ..=(after + ttl).duration_since(UNIX_EPOCH).expect("now");
                assert!(
                    window.start().as_millis() <= millis && millis <= window.end().as_millis(),
                    "cloudbus-expires-at is the publish time plus the time to live: {millis}"
                );
            }
            None => assert_eq!(properties["expiration"], Value::Null),
        }
        let expected: BTreeMap<String, Value> = message
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), json!(["str", v])))
            .collect();
        assert_eq!(
            headers, expected,
            "the attributes are the headers, as (long) strings"
        );
        assert_eq!(record["redelivered"], false);
    }
}
