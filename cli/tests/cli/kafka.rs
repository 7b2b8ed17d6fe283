//! Kafka on the broker of KAFKA_BROKERS: peek reads without joining the group; a
//! subscription's dead letters go back through the topic only with --to.

use crate::cases::{
    Place, Waiting, dead_letters_list_and_redrive, peek_leaves_messages, round_trip, stats_report,
};
use crate::common::unique;

/// A new member of a group gets its partitions after about half the session timeout.
const IDLE: &str = "15s";

fn place_urls() -> (String, String) {
    let topic = unique("cli");
    let group = unique("cli-group");
    let query = "create=true&partitions=2&start=earliest&max_deliveries=3&session_timeout=6s";
    (
        format!("kafka://{topic}?create=true&partitions=2"),
        format!("kafka://{topic}?subscription={group}&{query}"),
    )
}

/// Creates the subscription (its topic, dead-letter topic and start) before publishing.
async fn subscribe(url: &str) {
    let config = cloudbus::Config::from_url(url).expect("url");
    let cloudbus::Config::Kafka(config) = config else {
        panic!("a kafka url")
    };
    cloudbus::kafka::create_subscription(&config)
        .await
        .expect("subscription");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_round_trip_peek_and_stats() {
    let (publish, receive) = place_urls();
    subscribe(&receive).await;
    let place = Place {
        publish: &publish,
        receive: &receive,
        env: &[],
        idle: IDLE,
    };
    round_trip(&place);
    peek_leaves_messages(&place, true);
    stats_report(&place, Waiting::Unchecked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_redrive_through_the_topic_on_purpose() {
    let (publish, receive) = place_urls();
    subscribe(&receive).await;
    let to = publish.clone();
    let consumer = cloudbus::connect_subscriber(receive.as_str())
        .await
        .expect("subscriber");
    // Without --reason: a dead-letter topic is a log, and a filtered redrive could not move
    // the group's position past the records it leaves (see the README).
    let place = Place {
        publish: &publish,
        receive: &receive,
        env: &[],
        idle: IDLE,
    };
    dead_letters_list_and_redrive(&place, Some(&to), consumer, false).await;
}
