//! Amazon SQS and SNS (feature `aws`), on the official AWS SDK for Rust.
//!
//! Credentials and region come from the standard AWS configuration chain (environment,
//! profile, SSO, web identity, IMDS); `region` and `endpoint` options override them.
//!
//! Timeouts: connecting to the endpoint may take 3 s; one attempt of a call 10 s and the
//! call 30 s in all (the SDK retries transient failures, 3 attempts); a long poll
//! (`ReceiveMessage`) its wait plus 5 s, in one attempt. So when the broker or the network
//! stops answering, calls fail with a transient [`Error::Transport`] instead of hanging, and
//! a consumer backs off and resumes once the broker is back.

pub mod codec;
pub mod sns;
pub mod sqs;

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::batcher::{Batcher, Limits, SendBatch};
use crate::{Error, Message, Result};

/// Entries per SQS `SendMessageBatch` / `DeleteMessageBatch` and SNS `PublishBatch`.
const MAX_BATCH_ENTRIES: usize = 10;

/// How long to wait for a TCP (and TLS) connection to the endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt of a call (other than a long poll) may take before the SDK gives
/// up on it and retries. Without it, a call to a broker that accepts connections but does
/// not answer (a hung or paused process, a black-holed network path) would never return,
/// and neither would a consumer's receive loop or an ack.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call may take in all, retries included (the SDK makes up to 3 attempts).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a long poll (`ReceiveMessage` with a wait) may take beyond its wait.
const LONG_POLL_GRACE: Duration = Duration::from_secs(5);

/// The timeouts of every call: see [`CONNECT_TIMEOUT`], [`ATTEMPT_TIMEOUT`] and
/// [`OPERATION_TIMEOUT`].
fn default_timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// The timeouts of a long poll that waits up to `wait`: the answer is due after the wait,
/// so the call may take the wait plus [`LONG_POLL_GRACE`]; a broker that has not answered
/// by then fails the call at once (no further attempt that would wait as long again), and
/// the caller (the consumer's receive loop) backs off and retries.
fn long_poll_timeouts(wait: Duration) -> TimeoutConfig {
    let limit = wait + LONG_POLL_GRACE;
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(limit)
        .operation_timeout(limit)
        .build()
}

/// Loads the AWS configuration with optional overrides, and cloudbus's timeouts (the SDK
/// has none by default but a connect timeout): see [`default_timeouts`] and
/// [`long_poll_timeouts`].
async fn sdk_config(region: Option<&str>, endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).timeout_config(default_timeouts());
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_string()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// What an SDK error is about, for mapping it to a cloudbus error.
#[derive(Clone, Copy)]
struct Subject<'a> {
    transport: &'static str,
    entity: &'static str,
    name: &'a str,
}

/// Maps an SDK error to a cloudbus error: missing entities to `NotFound`, credential and
/// permission failures to `Unauthorized`, throttling, timeouts, connection failures and
/// 5xx to transient `Transport` errors. The message never contains credentials.
fn map_error<E>(subject: Subject<'_>, action: &str, error: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transport = subject.transport;
    let code = error.code().unwrap_or_default().to_string();
    let text = format!("{action}: {}", DisplayErrorContext(&error));
    let status = error.raw_response().map_or(0, |r| r.status().as_u16());
    let not_found = [
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "NotFound",
        "NotFoundException",
    ];
    let unauthorized = [
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "ExpiredToken",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "InvalidSecurity",
        "IncompleteSignature",
    ];
    let throttled = [
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "TooManyRequestsException",
        "KMSThrottling",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
    ];
    let service_answered = matches!(error, SdkError::ServiceError(_));
    let connection_failure = matches!(
        error,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    );
    let source: Arc<dyn std::error::Error + Send + Sync> = Arc::new(error);
    if not_found.contains(&code.as_str()) {
        return Error::NotFound {
            transport,
            entity: subject.entity,
            name: subject.name.to_string(),
        };
    }
    if unauthorized.contains(&code.as_str()) || status == 401 || status == 403 {
        return Error::Unauthorized {
            transport,
            message: text,
            source: Some(source),
        };
    }
    // The SDK fails before any request when it finds no credentials.
    if !service_answered && text.contains("credentials") {
        return Error::Unauthorized {
            transport,
            message: text,
            source: Some(source),
        };
    }
    let transient =
        connection_failure || throttled.contains(&code.as_str()) || status == 429 || status >= 500;
    Error::Transport {
        transport,
        message: text,
        transient,
        source: Some(source),
    }
}

/// What a batch call reports: the entry ids (input positions as text) that succeeded and
/// those that failed, with why; or an error for the whole call.
type BatchOutcome = Result<EntryOutcomes>;

/// Per-entry results of a batch call.
struct EntryOutcomes {
    succeeded: Vec<String>,
    failed: Vec<(String, Error)>,
}

/// The error for one failed entry of a batch call; sender faults are permanent.
fn entry_error(
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
fn outcomes_by_position(
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
async fn publish_in_batches<'a, F, Fut>(
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
fn start_batcher<F, Fut>(
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
