//! SQS and SNS on LocalStack.

use crate::cases::{
    Place, Waiting, dead_letters_list_and_redrive, peek_leaves_messages, round_trip, stats_report,
};
use crate::common::unique;

fn endpoint() -> String {
    std::env::var("CLOUDBUS_TEST_AWS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// A fresh queue with its dead-letter queue (3 receives), and the URL that reaches it.
fn queue() -> String {
    format!(
        "sqs://{}?create=true&max_receive_count=3&visibility=5s&wait=1s&endpoint={}",
        unique("cli"),
        endpoint()
    )
}

/// A fresh topic with one subscription: where to publish and where to receive.
fn topic() -> (String, String) {
    let topic = unique("cli");
    let query = format!(
        "create=true&max_receive_count=3&visibility=5s&wait=1s&endpoint={}",
        endpoint()
    );
    (
        format!("sns://{topic}?{query}"),
        format!("sns://{topic}?subscription={}&{query}", unique("cli-sub")),
    )
}

#[test]
fn sqs_round_trip() {
    let url = queue();
    round_trip(&Place {
        publish: &url,
        receive: &url,
        env: &[],
        idle: "3s",
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_dead_letters() {
    let url = queue();
    let consumer = cloudbus::connect_subscriber(url.as_str())
        .await
        .expect("subscriber");
    dead_letters_list_and_redrive(
        &Place {
            publish: &url,
            receive: &url,
            env: &[],
            idle: "3s",
        },
        None,
        consumer,
        true,
    )
    .await;
}

#[test]
fn sqs_peek_receives_and_releases_and_says_so() {
    let url = queue();
    peek_leaves_messages(
        &Place {
            publish: &url,
            receive: &url,
            env: &[],
            idle: "3s",
        },
        false,
    );
}

#[test]
fn sqs_stats() {
    let url = queue();
    stats_report(
        &Place {
            publish: &url,
            receive: &url,
            env: &[],
            idle: "3s",
        },
        Waiting::Exact,
    );
}

#[test]
fn sqs_missing_queue_exits_4() {
    let url = format!("sqs://{}?endpoint={}", unique("missing"), endpoint());
    let run = crate::common::cloudbus(&["receive", &url], &[], None).expect(4);
    assert!(run.stderr.contains("hint:"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_subscription_dead_letters_go_back_to_its_queue() {
    let (publish, receive) = topic();
    // The subscription exists before anything is published.
    let consumer = cloudbus::connect_subscriber(receive.as_str())
        .await
        .expect("subscriber");
    let place = Place {
        publish: &publish,
        receive: &receive,
        env: &[],
        idle: "3s",
    };
    dead_letters_list_and_redrive(&place, None, consumer, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_redrive_killed_halfway_and_run_again_loses_nothing() {
    let url = queue();
    let consumer = cloudbus::connect_subscriber(url.as_str())
        .await
        .expect("subscriber");
    let place = Place {
        publish: &url,
        receive: &url,
        env: &[],
        idle: "3s",
    };
    crate::cases::redrive_killed_halfway(&place, consumer, 60).await;
}
