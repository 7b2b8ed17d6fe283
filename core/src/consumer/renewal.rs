//! [`LockRenewal`]: keeping a message locked (invisible to other consumers) while its
//! handler runs.

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime};

use crate::{Delivery, Error};

/// The shortest pause between two renewal attempts, so a lock that is about to expire (or
/// a failing transport) cannot make the renewal loop spin.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// How the consumer renews the lock of a message while its handler runs.
///
/// The lock is extended each time two thirds of it have passed, by the lock's full
/// duration. The duration is read from [`Delivery::locked_until`] where the transport
/// reports it, otherwise it is [`LockRenewal::lock_duration`] (set it to the queue's
/// visibility timeout). Renewal stops as soon as the handler finishes, when the lock is
/// lost, or once [`LockRenewal::max_total`] has passed since the message was received;
/// after that the lock runs out and the message is redelivered, so a handler that hangs
/// does not hold its message forever.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::consumer::LockRenewal;
///
/// let renewal = LockRenewal::default()
///     .lock_duration(Duration::from_secs(30))
///     .max_total(Duration::from_secs(600));
/// # let _ = renewal;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRenewal {
    lock_duration: Duration,
    max_total: Duration,
}

impl Default for LockRenewal {
    /// Lock duration 30 s (when the transport does not report it), renewal up to 5 minutes.
    fn default() -> Self {
        LockRenewal {
            lock_duration: Duration::from_secs(30),
            max_total: Duration::from_secs(300),
        }
    }
}

impl LockRenewal {
    /// No renewal: a handler that outlives the lock sees its message redelivered.
    pub fn disabled() -> Self {
        LockRenewal {
            max_total: Duration::ZERO,
            ..LockRenewal::default()
        }
    }

    /// The lock duration to assume when the transport does not report when a lock expires.
    pub fn lock_duration(mut self, lock_duration: Duration) -> Self {
        self.lock_duration = lock_duration;
        self
    }

    /// How long after receipt the consumer keeps renewing; zero disables renewal.
    pub fn max_total(mut self, max_total: Duration) -> Self {
        self.max_total = max_total;
        self
    }
}

/// Renews the lock of `delivery` (received at `received_at`) as [`LockRenewal`] says.
/// Never completes: drop it to stop renewing.
pub(crate) async fn keep_locked(
    delivery: &mut Delivery,
    renewal: &LockRenewal,
    received_at: Instant,
) -> Infallible {
    if !renewal.max_total.is_zero() {
        renew_until_done(delivery, renewal, received_at).await;
    }
    std::future::pending().await
}

async fn renew_until_done(delivery: &mut Delivery, renewal: &LockRenewal, received_at: Instant) {
    // The lock's full duration: what is left of it now plus what has passed since receipt.
    let lock = match delivery.locked_until() {
        Some(until) => remaining(until) + received_at.elapsed(),
        None => renewal.lock_duration,
    };
    // Where the transport does not report the lock's expiry, track it ourselves.
    let mut assumed_until = received_at + renewal.lock_duration;
    loop {
        let left = match delivery.locked_until() {
            Some(until) => remaining(until),
            None => assumed_until.saturating_duration_since(Instant::now()),
        };
        if left.is_zero() {
            tracing::warn!(
                messaging.message.id = %delivery.message().id,
                "the lock expired before it could be renewed; the message may be redelivered"
            );
            return;
        }
        tokio::time::sleep((left * 2 / 3).max(MIN_PAUSE)).await;
        if received_at.elapsed() >= renewal.max_total {
            tracing::debug!(
                messaging.message.id = %delivery.message().id,
                max_total = ?renewal.max_total,
                "stopped renewing the lock: the maximum renewal time has passed"
            );
            return;
        }
        match delivery.extend(lock).await {
            Ok(()) => {
                assumed_until = Instant::now() + lock;
                tracing::trace!(messaging.message.id = %delivery.message().id, "lock renewed");
            }
            Err(error @ Error::LockLost { .. }) => {
                tracing::warn!(%error, "cannot renew the lock: it is lost");
                return;
            }
            Err(error) => {
                // Try again before the lock runs out.
                tracing::warn!(%error, "renewing the lock failed; trying again");
            }
        }
    }
}

fn remaining(until: SystemTime) -> Duration {
    until
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}
