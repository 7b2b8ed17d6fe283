//! What cloudbus declares on the broker: queues (durable quorum queues with a delivery
//! limit and at-least-once dead-lettering into `<queue>.dlq`), exchanges and bindings for
//! subscriptions, and the delay queues behind `nack(delay)` and delayed delivery.
//!
//! ## Delays
//!
//! RabbitMQ has no per-message delay (the delayed-message plugin is unmaintained and not on
//! Amazon MQ), so delays are built from queues whose messages expire after a fixed time and
//! are then dead-lettered onward, as NServiceBus does. There are [`LEVELS`] levels; level
//! `L` holds a message for `2^L` × [`TICK`]. A delay of `n` ticks is written in binary into
//! the routing key (one word per level, highest first: `0.1.1.0…`), and the message enters
//! at the level of its highest set bit. Each level's topic exchange routes a message whose
//! bit is `1` into the level's queue, to wait there, and one whose bit is `0` straight on
//! to the next level down; from level 0 the message reaches the headers exchange
//! `cloudbus.delay.deliver`, which routes it by its `cloudbus-delay-target` header to the
//! queue or exchange it was meant for. Every queue of a level holds messages for one and
//! the same time, so they expire in order at its head. The queues are quorum queues with
//! at-least-once dead-lettering: a message is never lost on the way, and the time it
//! waits is its delay rounded up to a tick.

use std::time::Duration;

use cloudbus_core::{Error, Result};
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::TRANSPORT;
use crate::config::dead_letter_queue;
use crate::error::{Subject, map_error};
use crate::mapping::{DELAY_TARGET, long_string};

/// The resolution of delays.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Delay levels: the longest delay is `2^LEVELS - 1` ticks (about 77 days).
pub(crate) const LEVELS: u32 = 26;
/// The prefix of the delay levels' exchanges and queues.
pub(crate) const DELAY_PREFIX: &str = "cloudbus.delay.";
/// The exchange that hands delayed messages to their targets.
pub(crate) const DELIVER: &str = "cloudbus.delay.deliver";

/// The longest delay.
pub(crate) fn max_delay() -> Duration {
    TICK * ((1u32 << LEVELS) - 1)
}

/// The exchange and queue of a delay level.
fn level(l: u32) -> String {
    format!("{DELAY_PREFIX}{l:02}")
}

/// Where a message of `delay` enters the delay queues, and its routing key; `None` for no
/// delay (a delay is rounded up to whole ticks, so only zero has none).
pub(crate) fn entry(delay: Duration) -> Result<Option<(String, String)>> {
    let ticks = delay.as_nanos().div_ceil(TICK.as_nanos());
    if ticks == 0 {
        return Ok(None);
    }
    let limit = u128::from((1u32 << LEVELS) - 1);
    if ticks > limit {
        return Err(Error::InvalidInput {
            transport: TRANSPORT,
            field: "delay",
            rule: format!(
                "a delay on RabbitMQ is at most {} ({:?} was asked): deliver it later in \
                 steps, or from a scheduler",
                humantime::format_duration(max_delay()),
                delay
            ),
        });
    }
    let highest = 127 - ticks.leading_zeros();
    let key = (0..LEVELS)
        .rev()
        .map(|bit| if ticks >> bit & 1 == 1 { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(".");
    Ok(Some((level(highest), key)))
}

/// The routing-key pattern that matches `value` at level `l`'s word.
fn pattern(l: u32, value: &str) -> String {
    (0..LEVELS)
        .rev()
        .map(|bit| if bit == l { value } else { "*" })
        .collect::<Vec<_>>()
        .join(".")
}

/// The header value of a delay target.
pub(crate) fn target(kind: Target, name: &str) -> String {
    match kind {
        Target::Queue => format!("q:{name}"),
        Target::Exchange => format!("x:{name}"),
    }
}

/// What a delayed message is delivered to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Queue,
    Exchange,
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string("quorum"));
    arguments
}

/// Arguments of a quorum queue that dead-letters at least once to `exchange`
/// (`routing_key`: its own when `None`).
fn dead_lettering(exchange: &str, routing_key: Option<&str>) -> FieldTable {
    let mut arguments = quorum();
    arguments.insert("x-dead-letter-exchange".into(), long_string(exchange));
    if let Some(key) = routing_key {
        arguments.insert("x-dead-letter-routing-key".into(), long_string(key));
    }
    // At-least-once dead-lettering needs reject-publish (else the broker falls back to
    // at-most-once, which drops a message it cannot place).
    arguments.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    arguments.insert("x-overflow".into(), long_string("reject-publish"));
    arguments
}

fn subject<'a>(entity: &'static str, name: &'a str) -> Subject<'a> {
    Subject { entity, name }
}

/// Declares `queue` (a durable quorum queue whose broker-side delivery limit dead-letters
/// after `max_deliveries` into `<queue>.dlq`) and its dead-letter queue, and binds it to
/// the delay exchange for the delayed nacks of its deliveries.
pub(crate) async fn declare_queue(
    channel: &Channel,
    queue: &str,
    max_deliveries: u32,
) -> Result<()> {
    let dead_letters = dead_letter_queue(queue);
    declare_dead_letter_queue(channel, &dead_letters).await?;
    let mut arguments = dead_lettering("", Some(&dead_letters));
    // The broker's count starts at 0 on the first delivery: a limit of max - 1 allows
    // max deliveries.
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(max_deliveries.saturating_sub(1))),
    );
    channel
        .queue_declare(queue.into(), durable_queue(), arguments)
        .await
        .map_err(|e| map_error("declaring the queue", subject("queue", queue), e))?;
    Ok(())
}

/// Declares a dead-letter queue: a quorum queue that dead-letters nothing further.
pub(crate) async fn declare_dead_letter_queue(channel: &Channel, queue: &str) -> Result<()> {
    channel
        .queue_declare(queue.into(), durable_queue(), quorum())
        .await
        .map_err(|e| {
            map_error(
                "declaring the dead-letter queue",
                subject("queue", queue),
                e,
            )
        })?;
    Ok(())
}

/// Declares the exchange of a topic (durable, fanout).
pub(crate) async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_error("declaring the exchange", subject("exchange", exchange), e))
}

/// Binds a subscription's queue to its topic's exchange.
pub(crate) async fn bind(channel: &Channel, queue: &str, exchange: &str) -> Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_error("binding the queue", subject("queue", queue), e))
}

/// Whether an exchange named `name` exists. Uses (and, when it does not, loses) `channel`:
/// a failed passive declaration closes the channel.
pub(crate) async fn exchange_exists(channel: &Channel, name: &str) -> Result<bool> {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => Ok(true),
        Err(e) => match map_error("looking up", subject("exchange", name), e) {
            Error::NotFound { .. } => Ok(false),
            other => Err(other),
        },
    }
}

/// Fails with `NotFound` unless the queue exists (the same caveat as [`exchange_exists`]).
pub(crate) async fn queue_exists(channel: &Channel, name: &str) -> Result<()> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .map(|_| ())
        .map_err(|e| map_error("looking up", subject("queue", name), e))
}

/// Declares the delay levels and the deliver exchange (idempotent).
pub(crate) async fn declare_delays(channel: &Channel) -> Result<()> {
    let topic = |name: String| async move {
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                map_error(
                    "declaring the delay exchange",
                    subject("exchange", &name),
                    e,
                )
            })
    };
    channel
        .exchange_declare(
            DELIVER.into(),
            ExchangeKind::Headers,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_error("declaring", subject("exchange", DELIVER), e))?;
    for l in 0..LEVELS {
        let name = level(l);
        let next = if l == 0 {
            DELIVER.to_string()
        } else {
            level(l - 1)
        };
        topic(name.clone()).await?;
        let mut arguments = dead_lettering(&next, None);
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt((TICK.as_millis() as i64) << l),
        );
        channel
            .queue_declare(name.as_str().into(), durable_queue(), arguments)
            .await
            .map_err(|e| map_error("declaring the delay queue", subject("queue", &name), e))?;
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                pattern(l, "1").into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_error("binding the delay queue", subject("queue", &name), e))?;
        channel
            .exchange_bind(
                next.as_str().into(),
                name.as_str().into(),
                pattern(l, "0").into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_error("binding the delay exchange", subject("exchange", &next), e))?;
    }
    Ok(())
}

/// Binds a queue or exchange to the deliver exchange, for the delayed messages meant for it.
pub(crate) async fn bind_delay_target(channel: &Channel, kind: Target, name: &str) -> Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-match".into(), long_string("all"));
    arguments.insert(DELAY_TARGET.into(), long_string(target(kind, name)));
    let outcome = match kind {
        Target::Queue => {
            channel
                .queue_bind(
                    name.into(),
                    DELIVER.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    arguments,
                )
                .await
        }
        Target::Exchange => {
            channel
                .exchange_bind(
                    name.into(),
                    DELIVER.into(),
                    "".into(),
                    ExchangeBindOptions::default(),
                    arguments,
                )
                .await
        }
    };
    let entity = match kind {
        Target::Queue => "queue",
        Target::Exchange => "exchange",
    };
    outcome.map_err(|e| map_error("binding for delayed delivery", subject(entity, name), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_enters_at_its_highest_bit_and_is_rounded_up_to_a_tick() {
        assert_eq!(entry(Duration::ZERO).unwrap(), None);
        let (exchange, key) = entry(Duration::from_millis(1)).unwrap().unwrap();
        assert_eq!(exchange, "cloudbus.delay.00");
        assert!(key.ends_with(".0.1") && key.split('.').count() == LEVELS as usize);
        // 2.5 s = 25 ticks = 0b11001: enters at level 4.
        let (exchange, key) = entry(Duration::from_millis(2_450)).unwrap().unwrap();
        assert_eq!(exchange, "cloudbus.delay.04");
        assert!(key.ends_with("0.1.1.0.0.1"), "{key}");
        assert!(entry(max_delay()).unwrap().is_some());
        let error = entry(max_delay() + TICK).unwrap_err();
        assert!(
            matches!(error, Error::InvalidInput { field: "delay", .. }),
            "{error}"
        );
    }

    #[test]
    fn each_level_looks_at_its_own_word() {
        let p = pattern(0, "1");
        assert!(p.ends_with(".*.1") && p.starts_with("*."));
        assert!(pattern(LEVELS - 1, "0").starts_with("0.*"));
    }
}
