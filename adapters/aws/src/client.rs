//! The AWS SDK configuration every client uses: the standard credential and region chain,
//! the `region` and `endpoint` overrides, and cloudbus's timeouts.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;

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
pub(crate) fn long_poll_timeouts(wait: Duration) -> TimeoutConfig {
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
pub(crate) async fn sdk_config(
    region: Option<&str>,
    endpoint: Option<&str>,
) -> aws_config::SdkConfig {
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
