//! Interoperability with the official Python SDK `azure-servicebus` against the project's
//! emulator: Python sends messages with application properties that the cloudbus
//! subscriber receives intact, and receives what cloudbus publishes. Needs the SDK's venv
//! (`emulator/scripts/python-venv`; `scripts/test` passes it as CLOUDBUS_TEST_SB_PYTHON).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudbus_azure::{ServiceBusPublisher, ServiceBusSubscriber};
use cloudbus_core::{Delivery, Message, Publisher, Subscriber};
use serde_json::{Value, json};
use servicebus_emulator::QueueConfig;

use crate::emulator;

fn python() -> String {
    std::env::var("CLOUDBUS_TEST_SB_PYTHON").unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/servicebus-py-venv/bin/python")
            .display()
            .to_string()
    })
}

fn sdk(args: &[&str]) -> Value {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/servicebus/servicebus_client.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (run emulator/scripts/python-venv)",
                python()
            )
        });
    assert!(
        output.status.success(),
        "azure-servicebus helper failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from the azure-servicebus helper")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_and_cloudbus_exchange_messages_intact() {
    let emulator = emulator::start_emulator().await;
    emulator
        .create_queue(QueueConfig::new("interop"))
        .expect("queue");
    let connection_string = emulator.connection_string();
    let queue = emulator::config(&connection_string, "interop");

    // Python -> cloudbus
    let binary: Vec<u8> = (0..=255u8).collect();
    let sent = json!([
        {"body_base64": BASE64.encode("hello from python"), "message_id": "py-1",
         "content_type": "text/plain", "correlation_id": "corr-1", "subject": "greeting",
         "properties": {"tenant": "acme", "count": 42, "flag": true}},
        {"body_base64": BASE64.encode(&binary), "message_id": "py-2", "properties": {}},
    ]);
    let path = std::env::temp_dir().join(format!("sb-{}.json", cloudbus_core::message::new_id()));
    std::fs::write(&path, sent.to_string()).expect("write");
    sdk(&[
        "send",
        &connection_string,
        "interop",
        path.to_str().expect("path"),
    ]);
    let subscriber = ServiceBusSubscriber::connect(&queue)
        .await
        .expect("connect");
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 2 && std::time::Instant::now() < deadline {
        got.extend(
            subscriber
                .receive(10, Duration::from_secs(2))
                .await
                .expect("receive"),
        );
    }
    assert_eq!(got.len(), 2);
    let by_id: BTreeMap<String, &Delivery> =
        got.iter().map(|d| (d.message().id.clone(), d)).collect();
    let hello = by_id["py-1"].message();
    assert_eq!(hello.text(), Some("hello from python"));
    assert_eq!(hello.content_type.as_deref(), Some("text/plain"));
    assert_eq!(hello.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(hello.subject.as_deref(), Some("greeting"));
    assert_eq!(hello.attributes["tenant"], "acme");
    assert_eq!(
        hello.attributes["count"], "42",
        "non-string properties arrive as text"
    );
    assert_eq!(hello.attributes["flag"], "true");
    assert_eq!(by_id["py-2"].message().payload.as_ref(), binary.as_slice());
    for d in got {
        assert_eq!(d.delivery_count(), 1);
        d.ack().await.expect("ack");
    }

    // cloudbus -> Python
    let publisher = ServiceBusPublisher::connect(&queue)
        .await
        .expect("connect publisher");
    let messages = vec![
        Message::new("héllo from cloudbus")
            .with_attribute("tenant", "acme")
            .with_attribute("with space", "ok")
            .with_content_type("text/plain")
            .with_correlation_id("corr-2")
            .with_subject("reply"),
        Message::new(binary.clone()),
    ];
    for outcome in publisher.publish_batch(messages.clone()).await {
        outcome.expect("publish");
    }
    let read = sdk(&["receive", &connection_string, "interop", "2"]);
    let read: BTreeMap<String, &Value> = read
        .as_array()
        .expect("array")
        .iter()
        .map(|m| (m["message_id"].as_str().unwrap_or_default().to_string(), m))
        .collect();
    for message in &messages {
        let m = read
            .get(&message.id)
            .unwrap_or_else(|| panic!("the SDK did not receive {}", message.id));
        let body = BASE64
            .decode(m["body_base64"].as_str().expect("body"))
            .expect("base64");
        assert_eq!(body, message.payload.as_ref());
        let properties: BTreeMap<String, String> =
            serde_json::from_value(m["properties"].clone()).expect("properties");
        assert_eq!(properties, message.attributes);
    }
    let first = read[&messages[0].id];
    assert_eq!(first["content_type"], "text/plain");
    assert_eq!(first["correlation_id"], "corr-2");
    assert_eq!(first["subject"], "reply");
    emulator.shutdown().await;
}
