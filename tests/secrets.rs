//! Secrets never leave a config: every transport is driven with secrets in its config
//! (a Service Bus SAS key in a connection string, an Event Hubs connection string, a Kafka
//! SASL password, a RabbitMQ password in its URI, AWS keys from the environment) through
//! failing connects, publishes and receives, with `tracing` at TRACE; the secret appears in
//! no log line, no error's text or `Debug`, and no config's `Debug`.
//!
//! Where a broker of the test run answers (`RABBITMQ_URL`, LocalStack at
//! `CLOUDBUS_TEST_AWS_ENDPOINT` or `http://127.0.0.1:4566`),
//! the case also goes through its refusal (a wrong password, a missing queue); otherwise
//! only through unreachable endpoints (port 1 on loopback, where nothing listens).

#![cfg(all(
    feature = "aws",
    feature = "azure",
    feature = "kafka",
    feature = "rabbitmq"
))]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudbus::Config;
use cloudbus_core::Message;

/// Everything logged, at every level.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A secret no code would write by chance.
fn secret(what: &str) -> String {
    format!(
        "{what}-Zq9{}",
        cloudbus_core::message::new_id().replace('-', "")
    )
}

/// `config` as a [`Config`].
fn parse(config: &serde_json::Value) -> Config {
    match serde_json::from_value(config.clone()) {
        Ok(config) => config,
        Err(error) => panic!("a valid config {config}: {error}"),
    }
}

/// What one transport printed: its config's `Debug`, and each error's text and `Debug`.
/// The publisher gets the config without its `subscription`.
async fn drive(json: serde_json::Value) -> Vec<String> {
    let mut printed = Vec::new();
    let config = parse(&json);
    let mut topic = json.clone();
    if let Some(fields) = topic.as_object_mut() {
        fields.remove("subscription");
    }
    let topic = parse(&topic);
    printed.push(format!("{config:?}"));
    printed.push(format!("{topic:?}"));
    let bound = Duration::from_secs(60);
    let mut note = |what: &str, error: &cloudbus_core::Error| {
        eprintln!("{} {what}: {error}", config.transport());
        printed.push(error.to_string());
        printed.push(format!("{error:?}"));
    };
    match tokio::time::timeout(bound, topic.connect_publisher()).await {
        Err(_) => panic!("{}: connect_publisher hung", config.transport()),
        Ok(Err(error)) => note("connect_publisher", &error),
        Ok(Ok(publisher)) => {
            match tokio::time::timeout(bound, publisher.publish(Message::new("x"))).await {
                Err(_) => panic!("{}: publish hung", config.transport()),
                Ok(Err(error)) => note("publish", &error),
                Ok(Ok(_)) => {}
            }
        }
    }
    match tokio::time::timeout(bound, config.connect_subscriber()).await {
        Err(_) => panic!("{}: connect_subscriber hung", config.transport()),
        Ok(Err(error)) => note("connect_subscriber", &error),
        Ok(Ok(subscriber)) => {
            let receive = subscriber.receive(1, Duration::from_secs(2));
            if let Ok(Err(error)) = tokio::time::timeout(bound, receive).await {
                note("receive", &error);
            }
        }
    }
    printed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_errors_or_debug() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber of this test binary");

    let sas_key = secret("saskey");
    let event_hubs_key = secret("ehkey");
    let sasl_password = secret("sasl");
    let rabbit_password = secret("amqp");
    let aws_secret = secret("awssecret");
    // SAFETY: set before any thread of this test reads the environment; the only test here.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKIDCLOUDBUSTEST");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", &aws_secret);
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let nowhere = "127.0.0.1:1";
    let mut configs = vec![
        serde_json::json!({
            "transport": "servicebus", "entity": "orders",
            "connection_string": format!(
                "Endpoint=sb://{nowhere}/;SharedAccessKeyName=RootManageSharedAccessKey;\
                 SharedAccessKey={sas_key};UseDevelopmentEmulator=true"),
            "publish_timeout": "2s",
        }),
        serde_json::json!({
            "transport": "kafka", "topic": "orders", "subscription": "billing",
            "brokers": nowhere, "auth": "scram_sha_512", "username": "cloudbus",
            "password": sasl_password, "publish_timeout": "2s",
        }),
        serde_json::json!({
            "transport": "kafka", "topic": "orders", "subscription": "billing",
            "auth": "event_hubs", "publish_timeout": "2s",
            "connection_string": format!(
                "Endpoint=sb://{nowhere}/;SharedAccessKeyName=send;SharedAccessKey={event_hubs_key}"),
        }),
        serde_json::json!({
            "transport": "rabbitmq", "name": "orders",
            "uri": format!("amqp://cloudbus:{rabbit_password}@{nowhere}/%2f"),
            "publish_timeout": "2s",
        }),
        serde_json::json!({
            "transport": "sqs", "queue": "orders", "endpoint": format!("http://{nowhere}"),
        }),
        serde_json::json!({
            "transport": "sns", "topic": "orders", "subscription": "orders-a",
            "endpoint": format!("http://{nowhere}"),
        }),
    ];
    if let Ok(url) = std::env::var("RABBITMQ_URL") {
        // The running broker refuses the wrong password.
        if let Some((_, host)) = url.rsplit_once('@') {
            configs.push(serde_json::json!({
                "transport": "rabbitmq", "name": "orders",
                "uri": format!("amqp://guest:{rabbit_password}@{host}"),
                "publish_timeout": "2s",
            }));
        }
    }
    let endpoint = std::env::var("CLOUDBUS_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let answers = endpoint
        .trim_start_matches("http://")
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|addr| std::net::TcpStream::connect(addr).is_ok());
    if answers {
        // LocalStack takes any key: the signed requests reach it, and a missing queue fails.
        configs.push(serde_json::json!({
            "transport": "sqs", "queue": format!("missing-{}", cloudbus_core::message::new_id()),
            "endpoint": endpoint,
        }));
    }

    let mut printed = Vec::new();
    for config in configs {
        printed.extend(drive(config).await);
    }
    let logged = log.text();
    assert!(
        logged.contains("TRACE"),
        "TRACE lines were captured (else this test checks nothing)"
    );
    for secret in [
        &sas_key,
        &event_hubs_key,
        &sasl_password,
        &rabbit_password,
        &aws_secret,
    ] {
        if let Some(line) = logged.lines().find(|line| line.contains(secret.as_str())) {
            panic!("a secret was logged: {line}");
        }
        if let Some(text) = printed.iter().find(|text| text.contains(secret.as_str())) {
            panic!("a secret was printed: {text}");
        }
    }
    eprintln!(
        "{} log lines and {} errors and Debug outputs checked",
        logged.lines().count(),
        printed.len()
    );
}
