//! Event sourcing on a log: an account's history is a stream of events on a topic (the
//! account id is the ordering key, so its events stay in order), and a projection rebuilds
//! the balances by replaying the topic from its beginning, then follows new events live.
//!
//! ```sh
//! cargo run --example event_sourcing                                   # the embedded broker
//! kafka/start
//! CLOUDBUS_URL='kafka://accounts?create=true' cargo run --features kafka --example event_sourcing
//! ```
//!
//! The URL names the topic. On memory:// a topic keeps its last `capacity` messages for
//! replay (from when its first subscription opened); on Kafka, whatever the topic retains.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use cloudbus::config::Start;
use cloudbus::{Config, Message, Subscriber, connect_publisher, connect_subscriber};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "Rebuild state by replaying a topic")]
struct Args {
    /// The topic of the account events (a cloudbus URL).
    #[arg(long, env = "CLOUDBUS_URL", default_value = "memory://accounts")]
    url: String,
}

/// What happened to an account: the events the aggregate publishes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Opened { account: String },
    Deposited { account: String, amount: i64 },
    Withdrew { account: String, amount: i64 },
}

impl Event {
    fn account(&self) -> &str {
        match self {
            Event::Opened { account }
            | Event::Deposited { account, .. }
            | Event::Withdrew { account, .. } => account,
        }
    }

    fn message(&self) -> Result<Message, serde_json::Error> {
        // The account is the ordering key: its events are applied in order.
        Ok(Message::from_json(self)?.with_ordering_key(self.account()))
    }
}

/// The projection: balances by account, built only from events.
#[derive(Debug, Default)]
struct Balances(BTreeMap<String, i64>);

impl Balances {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::Opened { account } => {
                self.0.entry(account.clone()).or_insert(0);
            }
            Event::Deposited { account, amount } => {
                *self.0.entry(account.clone()).or_default() += amount
            }
            Event::Withdrew { account, amount } => {
                *self.0.entry(account.clone()).or_default() -= amount
            }
        }
    }
}

/// Applies what arrives until `count` events of this run's accounts (their names end with
/// `run`) were applied, or a minute passed. (A Kafka topic keeps the events of earlier runs
/// of the example too; a real projection would apply them all.)
async fn project(
    subscriber: &dyn Subscriber,
    balances: &mut Balances,
    run: &str,
    count: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut applied = 0;
    while applied < count {
        if Instant::now() > deadline {
            return Err(format!("only {applied} of {count} events arrived").into());
        }
        for delivery in subscriber.receive(10, Duration::from_secs(1)).await? {
            let event: Event = delivery.message().json()?;
            if event.account().ends_with(run) {
                balances.apply(&event);
                applied += 1;
            }
            delivery.ack().await?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let topic: Config = args.url.parse()?;
    println!("transport: {} ({})", topic.transport(), args.url);
    let run = cloudbus::message::new_id();
    // A live subscription of the topic (an audit log, say): on memory:// the entity becomes
    // a topic, which keeps its messages for replay, once a subscription opens.
    let audit = connect_subscriber(topic.with_subscription(&format!("audit-{run}"))?).await?;

    let publisher = connect_publisher(&topic).await?;
    let history = [
        Event::Opened {
            account: format!("alice-{run}"),
        },
        Event::Deposited {
            account: format!("alice-{run}"),
            amount: 100,
        },
        Event::Opened {
            account: format!("bob-{run}"),
        },
        Event::Withdrew {
            account: format!("alice-{run}"),
            amount: 30,
        },
        Event::Deposited {
            account: format!("bob-{run}"),
            amount: 50,
        },
    ];
    for event in &history {
        publisher.publish(event.message()?).await?;
    }
    println!("published {} events", history.len());

    // The projection starts later: a new subscription that replays the topic from its
    // beginning rebuilds the state from the events alone.
    let replay = topic
        .with_subscription(&format!("balances-{run}"))?
        .with_start(Start::Earliest)?;
    let projection = connect_subscriber(replay).await?;
    let mut balances = Balances::default();
    project(projection.as_ref(), &mut balances, &run, history.len()).await?;
    println!("rebuilt from the log: {:?}", balances.0);

    // Then it follows new events as they are published.
    let later = Event::Deposited {
        account: format!("bob-{run}"),
        amount: 25,
    };
    publisher.publish(later.message()?).await?;
    project(projection.as_ref(), &mut balances, &run, 1).await?;
    println!("after a new event:    {:?}", balances.0);
    let expected = [(format!("alice-{run}"), 70), (format!("bob-{run}"), 75)];
    assert_eq!(
        balances.0,
        BTreeMap::from(expected),
        "the projection matches the events"
    );

    for subscriber in [&audit, &projection] {
        subscriber.close().await?;
    }
    publisher.close().await?;
    println!("done");
    Ok(())
}
