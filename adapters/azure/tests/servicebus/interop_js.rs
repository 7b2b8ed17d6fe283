//! Interoperability with the official JavaScript SDK `@azure/service-bus` (7.9.5) against
//! the project's emulator: a third Service Bus client, next to `azservicebus` (under
//! cloudbus) and the Python SDK. The SDK alone round-trips application properties and
//! binary bodies, sessions, dead-lettering and abandon; it sends what the cloudbus
//! subscriber receives intact, receives what cloudbus publishes, and ordering keys and
//! session ids cross between the two. Needs `node` on PATH and the SDK installed with
//! `npm ci --prefix adapters/azure/tests/servicebus/js` (`scripts/test` does it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudbus_azure::{ServiceBusPublisher, ServiceBusSubscriber};
use cloudbus_core::{Delivery, Message, Publisher, Subscriber};
use serde_json::{Value, json};
use servicebus_emulator::{EmulatorHandle, EntityProperties, QueueConfig};

use crate::emulator;

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/servicebus/js")
}

/// Runs `node servicebus_client.mjs <args>` off the runtime's workers (the emulator runs
/// on them) and parses its JSON output.
async fn sdk(args: &[&str]) -> Value {
    let dir = js_dir();
    assert!(
        dir.join("node_modules/@azure/service-bus").is_dir(),
        "the JavaScript SDK is not installed in {}: run \
         `npm ci --prefix adapters/azure/tests/servicebus/js`",
        dir.display()
    );
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .current_dir(&dir)
            .arg("servicebus_client.mjs")
            .args(&args)
            .output()
    })
    .await
    .expect("join")
    .unwrap_or_else(|e| panic!("cannot run node: {e} (install Node.js 20 or later)"));
    assert!(
        output.status.success(),
        "@azure/service-bus helper failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from the @azure/service-bus helper")
}

/// Sends `messages` (the helper's JSON shape) to `queue` with the SDK.
async fn sdk_send(connection_string: &str, queue: &str, messages: Value) {
    let path =
        std::env::temp_dir().join(format!("sb-js-{}.json", cloudbus_core::message::new_id()));
    std::fs::write(&path, messages.to_string()).expect("write");
    let sent = sdk(&[
        "send",
        connection_string,
        queue,
        path.to_str().expect("path"),
    ])
    .await;
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        sent["sent"].as_u64(),
        messages.as_array().map(|m| m.len() as u64)
    );
}

/// Receives up to `count` messages with the SDK; `options` are the helper's flags.
async fn sdk_receive(
    connection_string: &str,
    queue: &str,
    count: usize,
    options: &[&str],
) -> Vec<Value> {
    let count = count.to_string();
    let mut args = vec!["receive", connection_string, queue, &count];
    args.extend_from_slice(options);
    match sdk(&args).await {
        Value::Array(messages) => messages,
        other => panic!("expected an array from the helper, got {other}"),
    }
}

fn body(message: &Value) -> Vec<u8> {
    BASE64
        .decode(message["bodyBase64"].as_str().expect("bodyBase64"))
        .expect("base64")
}

fn ids(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["messageId"].as_str().expect("messageId"))
        .collect()
}

async fn start(queue: &str, requires_session: bool) -> (EmulatorHandle, String) {
    let emulator = emulator::start_emulator().await;
    emulator
        .create_queue(QueueConfig {
            name: queue.to_string(),
            properties: EntityProperties {
                requires_session,
                ..EntityProperties::default()
            },
        })
        .expect("queue");
    let connection_string = emulator.connection_string();
    (emulator, connection_string)
}

/// Receives with a cloudbus subscriber until `count` messages or 10 seconds.
async fn cloudbus_receive(subscriber: &ServiceBusSubscriber, count: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < count && Instant::now() < deadline {
        got.extend(
            subscriber
                .receive(count - got.len(), Duration::from_secs(1))
                .await
                .expect("receive"),
        );
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_round_trips_application_properties_and_a_binary_body() {
    let (emulator, cs) = start("js-props", false).await;
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    sdk_send(
        &cs,
        "js-props",
        json!([
            {"bodyBase64": BASE64.encode(&binary), "messageId": "js-bin",
             "contentType": "application/octet-stream",
             "applicationProperties": {"tenant": "acme", "count": 42, "negative": -7,
                                       "ratio": 2.5, "flag": true, "empty": ""}},
            {"bodyBase64": BASE64.encode("{\"not\": \"parsed\"}"), "messageId": "js-json",
             "contentType": "application/json"},
        ]),
    )
    .await;
    let got = sdk_receive(&cs, "js-props", 2, &[]).await;
    assert_eq!(ids(&got), ["js-bin", "js-json"]);
    assert_eq!(
        body(&got[0]),
        binary,
        "the binary body arrives byte for byte"
    );
    assert_eq!(got[0]["bodyType"], "data");
    assert_eq!(got[0]["contentType"], "application/octet-stream");
    assert_eq!(
        got[0]["applicationProperties"],
        json!({"tenant": "acme", "count": 42, "negative": -7, "ratio": 2.5,
               "flag": true, "empty": ""}),
        "application properties keep their values and types"
    );
    assert_eq!(
        got[0]["deliveryCount"], 0,
        "the SDK counts prior deliveries"
    );
    assert_eq!(body(&got[1]), b"{\"not\": \"parsed\"}");
    assert_eq!(got[1]["applicationProperties"], json!({}));
    assert_eq!(
        emulator.message_count("js-props"),
        Some(0),
        "both completed"
    );
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_sessions_keep_order_within_each_session() {
    let (emulator, cs) = start("js-sessions", true).await;
    // Interleaved: a-0, b-0, a-1, b-1, ...
    let messages: Vec<Value> = (0..4)
        .flat_map(|i| {
            ["a", "b"].map(|s| {
                json!({"bodyBase64": BASE64.encode(format!("{s}{i}")),
                       "messageId": format!("{s}-{i}"), "sessionId": format!("session-{s}")})
            })
        })
        .collect();
    sdk_send(&cs, "js-sessions", Value::Array(messages)).await;
    for s in ["b", "a"] {
        let session = format!("session-{s}");
        let got = sdk_receive(&cs, "js-sessions", 4, &["--session", &session]).await;
        let expected: Vec<String> = (0..4).map(|i| format!("{s}-{i}")).collect();
        assert_eq!(ids(&got), expected, "session {session} in send order");
        assert!(got.iter().all(|m| m["sessionId"] == session.as_str()));
        assert_eq!(body(&got[3]), format!("{s}3").as_bytes());
    }
    assert_eq!(emulator.message_count("js-sessions"), Some(0));
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_dead_letters_with_reason_and_description() {
    let (emulator, cs) = start("js-dlq", false).await;
    sdk_send(
        &cs,
        "js-dlq",
        json!([{"bodyBase64": BASE64.encode("poison"), "messageId": "js-poison",
                "applicationProperties": {"tenant": "acme"}}]),
    )
    .await;
    let settled = sdk_receive(
        &cs,
        "js-dlq",
        1,
        &[
            "--settle",
            "deadLetter",
            "--reason",
            "bad input",
            "--description",
            "field x is missing",
        ],
    )
    .await;
    assert_eq!(ids(&settled), ["js-poison"]);
    assert_eq!(emulator.message_count("js-dlq"), Some(0));
    assert_eq!(emulator.message_count("js-dlq/$DeadLetterQueue"), Some(1));
    let dead = sdk_receive(&cs, "js-dlq", 1, &["--dead-letter-queue"]).await;
    assert_eq!(ids(&dead), ["js-poison"]);
    assert_eq!(dead[0]["deadLetterReason"], "bad input");
    assert_eq!(dead[0]["deadLetterErrorDescription"], "field x is missing");
    assert_eq!(dead[0]["deadLetterSource"], "js-dlq");
    assert_eq!(dead[0]["applicationProperties"]["tenant"], "acme");
    assert_eq!(body(&dead[0]), b"poison");
    assert_eq!(emulator.message_count("js-dlq/$DeadLetterQueue"), Some(0));
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_abandon_redelivers_with_the_delivery_count_one_higher() {
    let (emulator, cs) = start("js-abandon", false).await;
    sdk_send(
        &cs,
        "js-abandon",
        json!([{"bodyBase64": BASE64.encode("again"), "messageId": "js-again"}]),
    )
    .await;
    let first = sdk_receive(&cs, "js-abandon", 1, &["--settle", "abandon"]).await;
    let second = sdk_receive(&cs, "js-abandon", 1, &[]).await;
    assert_eq!(ids(&first), ["js-again"]);
    assert_eq!(
        ids(&second),
        ["js-again"],
        "the abandoned message comes back"
    );
    let count = |m: &Value| m["deliveryCount"].as_u64().expect("deliveryCount");
    assert_eq!(count(&first[0]), 0);
    assert_eq!(count(&second[0]), count(&first[0]) + 1);
    assert_eq!(emulator.message_count("js-abandon"), Some(0));
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_sends_what_the_cloudbus_subscriber_receives_intact() {
    let (emulator, cs) = start("js-to-cloudbus", false).await;
    let binary: Vec<u8> = (0..=255u8).collect();
    sdk_send(
        &cs,
        "js-to-cloudbus",
        json!([
            {"bodyBase64": BASE64.encode(&binary), "messageId": "js-1",
             "contentType": "application/octet-stream", "correlationId": "corr-js",
             "subject": "greeting",
             "applicationProperties": {"tenant": "acme", "count": 42, "ratio": 2.5,
                                       "flag": false, "with space": "ok"}},
            {"bodyBase64": BASE64.encode("héllo from javascript"), "messageId": "js-2"},
        ]),
    )
    .await;
    let subscriber = ServiceBusSubscriber::connect(&emulator::config(&cs, "js-to-cloudbus"))
        .await
        .expect("connect");
    let got = cloudbus_receive(&subscriber, 2).await;
    assert_eq!(got.len(), 2);
    let by_id: BTreeMap<String, &Delivery> =
        got.iter().map(|d| (d.message().id.clone(), d)).collect();
    let first = by_id["js-1"].message();
    assert_eq!(first.payload.as_ref(), binary.as_slice());
    assert_eq!(
        first.content_type.as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(first.correlation_id.as_deref(), Some("corr-js"));
    assert_eq!(first.subject.as_deref(), Some("greeting"));
    let attributes: BTreeMap<&str, &str> = first
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        attributes,
        BTreeMap::from([
            ("tenant", "acme"),
            ("count", "42"),
            ("ratio", "2.5"),
            ("flag", "false"),
            ("with space", "ok"),
        ]),
        "application properties become attributes, non-strings as text"
    );
    let second = by_id["js-2"].message();
    assert_eq!(second.text(), Some("héllo from javascript"));
    assert!(second.attributes.is_empty() && second.content_type.is_none());
    for d in got {
        assert_eq!(d.delivery_count(), 1);
        d.ack().await.expect("ack");
    }
    subscriber.close().await.expect("close");
    assert_eq!(emulator.message_count("js-to-cloudbus"), Some(0));
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudbus_publishes_what_the_js_sdk_receives_intact() {
    let (emulator, cs) = start("cloudbus-to-js", false).await;
    let binary: Vec<u8> = (0..=255u8).collect();
    let messages = vec![
        Message::new("héllo from cloudbus")
            .with_attribute("tenant", "acme")
            .with_attribute("with space", "ok")
            .with_attribute("empty", "")
            .with_content_type("text/plain")
            .with_correlation_id("corr-cb")
            .with_subject("reply"),
        Message::new(binary.clone()).with_attribute("kind", "binary"),
    ];
    let publisher = ServiceBusPublisher::connect(&emulator::config(&cs, "cloudbus-to-js"))
        .await
        .expect("connect publisher");
    for outcome in publisher.publish_batch(messages.clone()).await {
        outcome.expect("publish");
    }
    publisher.close().await.expect("close");
    let got = sdk_receive(&cs, "cloudbus-to-js", 2, &[]).await;
    let by_id: BTreeMap<&str, &Value> = got
        .iter()
        .map(|m| (m["messageId"].as_str().expect("messageId"), m))
        .collect();
    for message in &messages {
        let m = by_id
            .get(message.id.as_str())
            .unwrap_or_else(|| panic!("the SDK did not receive {}", message.id));
        assert_eq!(body(m), message.payload.as_ref());
        assert_eq!(m["bodyType"], "data");
        let properties: BTreeMap<String, String> =
            serde_json::from_value(m["applicationProperties"].clone()).expect("properties");
        assert_eq!(
            properties, message.attributes,
            "attributes arrive as strings"
        );
        assert_eq!(m["deliveryCount"], 0);
    }
    let first = by_id[messages[0].id.as_str()];
    assert_eq!(first["contentType"], "text/plain");
    assert_eq!(first["correlationId"], "corr-cb");
    assert_eq!(first["subject"], "reply");
    assert_eq!(first["sessionId"], Value::Null);
    assert_eq!(emulator.message_count("cloudbus-to-js"), Some(0));
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudbus_ordering_keys_are_sessions_the_js_sdk_accepts_in_order() {
    let (emulator, cs) = start("cloudbus-sessions", true).await;
    let mut config = emulator::config(&cs, "cloudbus-sessions");
    config.sessions = true;
    let publisher = ServiceBusPublisher::connect(&config)
        .await
        .expect("connect publisher");
    // Interleaved keys; each key's messages in order.
    let messages: Vec<Message> = (0..5)
        .flat_map(|i| {
            ["red", "blue"].map(|key| {
                Message::new(format!("{key} {i}"))
                    .with_id(format!("{key}-{i}"))
                    .with_ordering_key(key)
            })
        })
        .collect();
    for outcome in publisher.publish_batch(messages).await {
        outcome.expect("publish");
    }
    publisher.close().await.expect("close");
    for key in ["blue", "red"] {
        let got = sdk_receive(&cs, "cloudbus-sessions", 5, &["--session", key]).await;
        let expected: Vec<String> = (0..5).map(|i| format!("{key}-{i}")).collect();
        assert_eq!(ids(&got), expected, "session {key} in publish order");
        assert!(got.iter().all(|m| m["sessionId"] == key));
        assert_eq!(body(&got[0]), format!("{key} 0").as_bytes());
    }
    assert_eq!(emulator.message_count("cloudbus-sessions"), Some(0));
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_session_ids_are_ordering_keys_for_cloudbus() {
    let (emulator, cs) = start("js-sessions-to-cloudbus", true).await;
    let messages: Vec<Value> = (0..4)
        .flat_map(|i| {
            ["x", "y"].map(|s| {
                json!({"bodyBase64": BASE64.encode(format!("{s}{i}")),
                       "messageId": format!("{s}-{i}"), "sessionId": s})
            })
        })
        .collect();
    sdk_send(&cs, "js-sessions-to-cloudbus", Value::Array(messages)).await;
    let mut config = emulator::config(&cs, "js-sessions-to-cloudbus");
    config.sessions = true;
    let subscriber = ServiceBusSubscriber::connect(&config)
        .await
        .expect("connect");
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut received = 0;
    while received < 8 && Instant::now() < deadline {
        for d in cloudbus_receive(&subscriber, 8 - received).await {
            let m = d.message();
            by_key
                .entry(m.ordering_key.clone().expect("an ordering key"))
                .or_default()
                .push(m.id.clone());
            received += 1;
            d.ack().await.expect("ack");
        }
    }
    let expected = |s: &str| (0..4).map(|i| format!("{s}-{i}")).collect::<Vec<_>>();
    assert_eq!(
        by_key,
        BTreeMap::from([
            ("x".to_string(), expected("x")),
            ("y".to_string(), expected("y"))
        ]),
        "each session id is an ordering key, its messages in send order"
    );
    subscriber.close().await.expect("close");
    assert_eq!(emulator.message_count("js-sessions-to-cloudbus"), Some(0));
    emulator.shutdown().await;
}
