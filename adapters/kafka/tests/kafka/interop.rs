//! Interoperability with a client cloudbus did not write: the official Python
//! `confluent-kafka` produces records with keys and headers that cloudbus receives intact,
//! and reads what cloudbus publishes using only the mapping the README documents. Needs its
//! venv (`scripts/test` passes it as CLOUDBUS_TEST_KAFKA_PYTHON).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudbus_core::driver::TransportConfig;
use cloudbus_core::{Message, Publisher, Subscriber};
use cloudbus_kafka::{KafkaPublisher, KafkaSubscriber};
use serde_json::{Value, json};

use crate::harness::{brokers, config};

fn python() -> String {
    std::env::var("CLOUDBUS_TEST_KAFKA_PYTHON").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../target/kafka-py-venv/bin/python"
        )
        .into()
    })
}

/// Runs the confluent-kafka helper and parses its JSON output.
fn client(args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/confluent_client.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (see scripts/test)", python()));
    assert!(
        output.status.success(),
        "confluent-kafka helper failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from the confluent-kafka helper")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_kafka_produces_and_cloudbus_receives_intact() {
    let topic = format!("interop-in-{}", cloudbus_core::message::new_id());
    let mut created = config(&topic).with_subscription("cloudbus").expect("group");
    created.create = true;
    created.start = cloudbus_core::config::Start::Earliest;
    let subscriber = KafkaSubscriber::connect(&created).await.expect("subscribe");
    let binary: Vec<u8> = (0..=255u8).collect();
    let sent = json!([
        {"key": "customer-1", "value_base64": BASE64.encode("hello from python"),
         "headers": [["tenant", BASE64.encode("acme")], ["cloudbus.content-type", BASE64.encode("text/plain")]]},
        {"key": null, "value_base64": BASE64.encode(&binary),
         "headers": [["raw", BASE64.encode([0xffu8, 0x00])], ["flag", null]]},
        {"key": "customer-1", "value_base64": BASE64.encode("second of the key"), "headers": []},
    ]);
    let path = std::env::temp_dir().join(format!("{topic}.json"));
    std::fs::write(&path, sent.to_string()).expect("write");
    client(&["produce", &brokers(), &topic, path.to_str().expect("path")]);

    // Records of one key arrive one at a time: the second of customer-1 waits for the
    // first to be settled.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 2 && Instant::now() < deadline {
        got.extend(
            subscriber
                .receive(10, Duration::from_secs(1))
                .await
                .expect("receive"),
        );
    }
    assert_eq!(
        got.len(),
        2,
        "the first record of the key and the unkeyed one"
    );
    let by_text: BTreeMap<Vec<u8>, &cloudbus_core::Delivery> = got
        .iter()
        .map(|d| (d.message().payload.to_vec(), d))
        .collect();
    let hello = by_text[b"hello from python".as_slice()].message();
    assert_eq!(
        hello.ordering_key.as_deref(),
        Some("customer-1"),
        "the key is the ordering key"
    );
    assert_eq!(hello.attributes["tenant"], "acme");
    assert_eq!(hello.content_type.as_deref(), Some("text/plain"));
    assert!(
        hello.id.starts_with(&format!("{topic}/")),
        "a foreign record's id: {}",
        hello.id
    );
    let raw = by_text[&binary].message();
    assert_eq!(
        raw.payload.as_ref(),
        binary.as_slice(),
        "values are byte-exact"
    );
    assert_eq!(raw.ordering_key, None);
    assert_eq!(
        raw.attributes["raw"],
        BASE64.encode([0xffu8, 0x00]),
        "non-UTF-8 headers arrive base64"
    );
    assert_eq!(
        raw.attributes["flag"], "",
        "a header without a value is empty"
    );
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    let second = subscriber
        .receive(10, Duration::from_secs(10))
        .await
        .expect("receive");
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].message().text(), Some("second of the key"));
    subscriber.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudbus_publishes_and_confluent_kafka_reads_by_the_readme_mapping() {
    let topic = format!("interop-out-{}", cloudbus_core::message::new_id());
    let mut target = config(&topic);
    target.create = true;
    let publisher = KafkaPublisher::connect(&target).await.expect("connect");
    let binary: Vec<u8> = (0..=255u8).collect();
    let messages = vec![
        Message::new("héllo")
            .with_attribute("tenant", "acme")
            .with_content_type("text/plain")
            .with_correlation_id("corr-1")
            .with_subject("greeting")
            .with_ordering_key("customer-7"),
        Message::new(binary.clone()),
    ];
    for message in &messages {
        publisher.publish(message.clone()).await.expect("publish");
    }
    publisher.close().await.expect("close");
    let read = client(&["consume", &brokers(), &topic, "2"]);
    let read = read.as_array().expect("array");
    assert_eq!(read.len(), 2);
    let headers = |record: &Value| -> BTreeMap<String, String> {
        record["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap_or_default().to_string(),
                    h[1].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    for message in &messages {
        let record = read
            .iter()
            .find(|r| headers(r).get("cloudbus.id") == Some(&message.id))
            .unwrap_or_else(|| panic!("confluent-kafka did not read {}", message.id));
        let value = BASE64
            .decode(record["value_base64"].as_str().expect("value"))
            .expect("base64");
        assert_eq!(
            value,
            message.payload.as_ref(),
            "the value is the payload, byte-exact"
        );
        assert_eq!(
            record["key"].as_str(),
            message.ordering_key.as_deref(),
            "the key is the ordering key"
        );
        let headers = headers(record);
        for (key, value) in &message.attributes {
            assert_eq!(headers.get(key), Some(value), "attribute {key} is a header");
        }
        let fields = [
            ("cloudbus.content-type", &message.content_type),
            ("cloudbus.correlation-id", &message.correlation_id),
            ("cloudbus.subject", &message.subject),
        ];
        for (name, field) in fields {
            assert_eq!(headers.get(name), field.as_ref(), "{name}");
        }
    }
}
