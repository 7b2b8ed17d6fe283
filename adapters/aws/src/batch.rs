//! Batch calls (`SendMessageBatch`, `PublishBatch`): one outcome per message, the batches
//! of `publish_batch`, and the automatic batcher of concurrent `publish()` calls.

use std::sync::Arc;
use std::time::Duration;

use cloudbus_core::driver::batcher::{Batcher, Limits, SendBatch};
use cloudbus_core::{Error, Message, Result};

use crate::codec;

/// Entries per SQS `SendMessageBatch` / `DeleteMessageBatch` and SNS `PublishBatch`.
pub(crate) const MAX_BATCH_ENTRIES: usize = 10;

/// What a batch call reports: the entry ids (input positions as text) that succeeded and
/// those that failed, with why; or an error for the whole call.
pub(crate) type BatchOutcome = Result<EntryOutcomes>;

/// Per-entry results of a batch call.
pub(crate) struct EntryOutcomes {
    pub(crate) succeeded: Vec<String>,
    pub(crate) failed: Vec<(String, Error)>,
}

/// The error for one failed entry of a batch call; sender faults are permanent.
pub(crate) fn entry_error(
    transport: &'static str,
    action: &str,
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
) -> Error {
    Error::transport(
        transport,
        format!(
            "{action} entry failed: {code}: {}",
            message.unwrap_or_default()
        ),
        !sender_fault,
        None,
    )
}

/// One outcome per entry of a batch call of `len` entries whose entry ids were their
/// positions in the call.
pub(crate) fn outcomes_by_position(
    transport: &'static str,
    len: usize,
    outcome: BatchOutcome,
) -> Vec<Result<()>> {
    let entries = match outcome {
        Err(error) => return vec![Err(error); len],
        Ok(entries) => entries,
    };
    let mut outcomes: Vec<Option<Result<()>>> = vec![None; len];
    let position = |id: &str| id.parse::<usize>().ok().filter(|i| *i < len);
    for id in entries.succeeded {
        if let Some(i) = position(&id) {
            outcomes[i] = Some(Ok(()));
        }
    }
    for (id, error) in entries.failed {
        if let Some(i) = position(&id) {
            outcomes[i] = Some(Err(error));
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or_else(|| Err(Error::unreported(transport))))
        .collect()
}

/// Publishes `messages` in batch calls: encodes each (a message that fails validation fails
/// alone), groups the rest into batches of at most `max_entries` and `max_bytes`, sends the
/// batches concurrently with `send`, and returns one outcome per message in input order.
pub(crate) async fn publish_in_batches<'a, F, Fut>(
    messages: &[Message],
    target: codec::Target,
    max_entries: usize,
    max_bytes: usize,
    send: F,
) -> Vec<Result<String>>
where
    F: Fn(Vec<codec::Encoded>) -> Fut,
    Fut: std::future::Future<Output = BatchOutcome> + 'a,
{
    let mut outcomes: Vec<Option<Result<String>>> = messages.iter().map(|_| None).collect();
    let mut valid = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        match codec::encode(message, target, true) {
            Ok(encoded) => valid.push((i, encoded)),
            Err(error) => outcomes[i] = Some(Err(error)),
        }
    }
    let calls = codec::batches(valid, max_entries, max_bytes)
        .into_iter()
        .map(|batch| {
            let (positions, batch): (Vec<usize>, Vec<codec::Encoded>) = batch.into_iter().unzip();
            let call = send(batch);
            async move {
                let len = positions.len();
                (
                    positions,
                    outcomes_by_position(target.transport, len, call.await),
                )
            }
        });
    for (positions, results) in futures::future::join_all(calls).await {
        for (i, result) in positions.into_iter().zip(results) {
            outcomes[i] = Some(result.map(|()| messages[i].id.clone()));
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or_else(|| Err(Error::unreported(target.transport))))
        .collect()
}

/// Batch calls in flight at most per publisher with automatic batching.
const BATCH_CALLS: usize = 16;

/// The automatic batcher of an SQS or SNS publisher, or `None` with `batching=false`.
/// `send` makes one batch call (entry ids = positions).
pub(crate) fn start_batcher<F, Fut>(
    transport: &'static str,
    batching: bool,
    linger: Duration,
    batch_size: usize,
    max_bytes: usize,
    send: F,
) -> Result<Option<Batcher<codec::Encoded>>>
where
    F: Fn(Vec<codec::Encoded>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = BatchOutcome> + Send + 'static,
{
    if !(1..=MAX_BATCH_ENTRIES).contains(&batch_size) {
        return Err(Error::config(format!(
            "`batch_size={batch_size}`: {transport} batch calls take 1 to {MAX_BATCH_ENTRIES} \
             messages; set batch_size between 1 and {MAX_BATCH_ENTRIES} (or batching=false)"
        )));
    }
    if !batching {
        return Ok(None);
    }
    let limits = Limits {
        max_items: batch_size,
        max_bytes,
        linger,
        max_calls: BATCH_CALLS,
    };
    let send: SendBatch<codec::Encoded> = Arc::new(move |batch: Vec<codec::Encoded>| {
        let len = batch.len();
        let call = send(batch);
        Box::pin(async move { outcomes_by_position(transport, len, call.await) })
    });
    Ok(Some(Batcher::start(transport, "publisher", limits, send)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_position_gets_an_outcome_and_unreported_ones_are_transient() {
        let refused = Error::transport(TRANSPORT_FOR_TESTS, "refused", false, None);
        let entries = EntryOutcomes {
            // Position 3 is missing; "7" and "x" name no position of a 4-entry batch.
            succeeded: vec!["0".into(), "7".into(), "x".into()],
            failed: vec![("2".into(), refused)],
        };
        let outcomes = outcomes_by_position(TRANSPORT_FOR_TESTS, 4, Ok(entries));
        assert_eq!(outcomes.len(), 4);
        assert!(outcomes[0].is_ok());
        for i in [1, 3] {
            let error = outcomes[i]
                .as_ref()
                .expect_err("no report means no success");
            assert!(error.is_transient(), "{i}: {error}");
            assert!(error.to_string().contains("may or may not"), "{error}");
        }
        let error = outcomes[2].as_ref().expect_err("reported as failed");
        assert!(!error.is_transient() && error.to_string().contains("refused"));
    }

    #[test]
    fn a_failed_call_fails_every_position() {
        let down = Error::transport(TRANSPORT_FOR_TESTS, "down", true, None);
        let outcomes = outcomes_by_position(TRANSPORT_FOR_TESTS, 3, Err(down));
        assert_eq!(outcomes.len(), 3);
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Err(e) if e.to_string().contains("down")))
        );
    }

    const TRANSPORT_FOR_TESTS: &str = "sqs";
}
