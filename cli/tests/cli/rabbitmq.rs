//! RabbitMQ on the broker of RABBITMQ_URL: a task queue, and a subscription whose dead
//! letters go back to its own queue.

use crate::cases::{
    Place, Waiting, dead_letters_list_and_redrive, peek_leaves_messages, round_trip, stats_report,
};
use crate::common::unique;

fn queue() -> String {
    format!("rabbitmq://{}?create=true&max_deliveries=3", unique("cli"))
}

#[test]
fn rabbitmq_round_trip_peek_and_stats() {
    let url = queue();
    let place = Place {
        publish: &url,
        receive: &url,
        env: &[],
        idle: "3s",
    };
    round_trip(&place);
    peek_leaves_messages(&place, false);
    stats_report(&place, Waiting::Exact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_subscription_dead_letters_go_back_to_its_queue() {
    let exchange = unique("cli");
    let publish = format!("rabbitmq://{exchange}");
    let receive = format!(
        "rabbitmq://{exchange}?subscription={}&create=true&max_deliveries=3",
        unique("cli-sub")
    );
    // The subscription exists before anything is published to the exchange.
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
async fn rabbitmq_redrive_killed_halfway_and_run_again_loses_nothing() {
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
    crate::cases::redrive_killed_halfway(&place, consumer, 200).await;
}
