//! `cloudbus peek`: shows messages without consuming them where the transport can; where
//! it cannot, says so and receives them, holding each, then gives them all back.

use std::time::Duration;

use cloudbus::Error;

use crate::exit::Failure;
use crate::output::{Columns, Output, Record};
use crate::target::Target;

use super::{Held, close, receive_until, subscriber};

/// How long a receive-and-release peek waits for more messages.
const QUIET: Duration = Duration::from_secs(3);

pub async fn run(target: Target, max: usize, output: &Output) -> Result<u8, Failure> {
    for record in look(&target, max, output).await? {
        output.message(&record, Columns::Messages);
    }
    Ok(0)
}

/// Up to `max` messages of `target`, left in place: peeked where the transport can,
/// else received and given back (after saying so on standard error).
pub async fn look(target: &Target, max: usize, output: &Output) -> Result<Vec<Record>, Failure> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let inspector = target
        .config
        .connect_inspector()
        .await
        .map_err(|e| Failure::of("connecting to", &target.shown, e));
    let unsupported = match inspector {
        Ok(inspector) => {
            let peeked = inspector.peek(max).await;
            let _ = inspector.close().await;
            match peeked {
                Ok(peeked) => return Ok(peeked.iter().map(Record::of_peeked).collect()),
                Err(Error::Unsupported { feature, .. }) => feature,
                Err(error) => return Err(Failure::of("peeking at", &target.shown, error)),
            }
        }
        Err(failure) if failure.code() == crate::exit::UNSUPPORTED => failure.to_string(),
        Err(failure) => return Err(failure),
    };
    output.note(&format!(
        "cloudbus: {} cannot show messages without taking them ({unsupported}).\n  \
         Receiving up to {max} and giving each back at the end instead: their delivery \
         counts grow by one, and other consumers do not get them meanwhile.",
        target.config.transport()
    ));
    let subscriber = subscriber(target).await?;
    let mut held = Held::default();
    let mut records = Vec::new();
    let outcome = receive_until(
        subscriber.as_ref(),
        Some(max),
        QUIET,
        false,
        &mut held,
        async |delivery, held: &mut Held| {
            records.push(Record::of_delivery(&delivery));
            held.hold(delivery);
            Ok(())
        },
        &target.shown,
    )
    .await;
    held.release(output).await;
    close(subscriber, output).await;
    outcome.map(|_| records)
}
