//! The run loop: receive for free slots, hand each delivery to a task, settle it from the
//! handler's result, and drain on shutdown.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use super::Settings;
use super::handler::{Context, Handler, HandlerError, RETRIES_EXHAUSTED};
use super::ordering::{Lanes, Next, Turn};
use super::renewal::keep_locked;
use super::retry::Backoff;
use super::summary::{Stats, StopReason, Summary, bump};
use super::telemetry::{HandlerOutcome, Instruments, describe_metrics, process_span};
use crate::{Delivery, Error, Subscriber};

/// The least time between two receive calls that returned nothing, in case a transport
/// returns at once instead of waiting.
const IDLE_PAUSE: Duration = Duration::from_millis(50);
/// The longest dead-letter description written, in bytes.
const MAX_DESCRIPTION: usize = 1024;

/// What one run shares with its delivery tasks.
struct Shared<H> {
    handler: H,
    settings: Settings,
    stats: Stats,
    instruments: Instruments,
    /// Cancelled by the caller: stop receiving, do not start more handlers.
    shutdown: CancellationToken,
    /// Cancelled at the shutdown deadline: stop the handlers still running.
    deadline_passed: CancellationToken,
    /// Cancelled once the run loop has ended and no receive call of this consumer is in
    /// progress any more. Releases during shutdown wait for it (see [`finish_receiving`]).
    receiving_ended: CancellationToken,
}

/// A receive call in progress with the slots it holds and when it was asked; owned so
/// that it can outlive the run loop.
type Poll = Pin<
    Box<
        dyn Future<
                Output = (
                    crate::Result<Vec<Delivery>>,
                    Vec<OwnedSemaphorePermit>,
                    Instant,
                ),
            > + Send,
    >,
>;

pub(crate) async fn run<H: Handler>(
    subscriber: Arc<dyn Subscriber>,
    settings: Settings,
    handler: H,
    shutdown: CancellationToken,
) -> Summary {
    describe_metrics();
    let shared = Arc::new(Shared {
        handler,
        instruments: Instruments::new(&settings.destination),
        stats: Stats::default(),
        shutdown: shutdown.clone(),
        deadline_passed: CancellationToken::new(),
        receiving_ended: CancellationToken::new(),
        settings,
    });
    let slots = Arc::new(Semaphore::new(shared.settings.concurrency));
    let lanes = Lanes::default();
    let mut tasks = JoinSet::new();
    let (base, cap) = shared.settings.receive_backoff;
    let mut backoff = Backoff::new(base, cap);

    let receivers = shared
        .settings
        .receivers()
        .min(subscriber.concurrent_receives())
        .max(1);
    let fair_share = shared.settings.concurrency / receivers;
    let batch = subscriber.receive_batch().max(1);
    // Receive calls in progress, each with the slots it holds and when it was asked.
    let mut polls: FuturesUnordered<Poll> = FuturesUnordered::new();
    // After an empty receive, one call at a time (an idle queue costs one long poll per
    // wait, not `receivers`); after one that returned messages, up to `receivers`.
    let mut idle = true;
    // No new receive before this (after a failure or a receive that returned at once).
    let mut paused_until: Option<tokio::time::Instant> = None;
    let stopped = loop {
        while let Some(joined) = tasks.try_join_next() {
            report_task_failure(joined);
        }
        let limit = if idle { 1 } else { receivers };
        let may_start = polls.len() < limit && paused_until.is_none();
        // The first call takes what is free; further ones wait for a fair share of the
        // slots, so that each asks for a full batch instead of a few messages.
        let least = if polls.is_empty() { 1 } else { fair_share };
        let pause_over = async {
            match paused_until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            biased;
            () = shutdown.cancelled() => break StopReason::Cancelled,
            Some(done) = polls.next(), if !polls.is_empty() => PollEvent::Done(done),
            () = pause_over => PollEvent::PauseOver,
            permits = free_slots(&slots, least, batch), if may_start => PollEvent::Slots(permits),
        };
        let (received, permits, asked_at) = match event {
            PollEvent::PauseOver => {
                paused_until = None;
                continue;
            }
            PollEvent::Slots(None) => break StopReason::Cancelled,
            PollEvent::Slots(Some(permits)) => {
                let (subscriber, max) = (subscriber.clone(), permits.len());
                let wait = shared.settings.receive_wait;
                polls.push(Box::pin(async move {
                    let asked_at = Instant::now();
                    (subscriber.receive(max, wait).await, permits, asked_at)
                }));
                continue;
            }
            PollEvent::Done(done) => done,
        };
        match received {
            Ok(batch) => {
                backoff.reset();
                idle = batch.is_empty();
                let mut permits = permits.into_iter();
                for delivery in batch {
                    match permits.next() {
                        Some(permit) => dispatch(&shared, &lanes, &mut tasks, delivery, permit),
                        None => {
                            tracing::warn!(
                                "the transport returned more messages than asked for; releasing the extra one"
                            );
                            tasks.spawn(release_extra(delivery).with_current_subscriber());
                        }
                    }
                }
                if idle && asked_at.elapsed() < IDLE_PAUSE {
                    paused_until = Some(tokio::time::Instant::now() + IDLE_PAUSE);
                }
            }
            Err(Error::Closed { .. }) => break StopReason::SubscriberClosed,
            Err(error) => {
                bump(&shared.stats.receive_errors);
                shared.instruments.receive_errors.increment(1);
                idle = true;
                let pause = backoff.next_delay();
                let destination = &shared.settings.destination;
                if error.is_transient() {
                    tracing::warn!(
                        messaging.system = destination.system(),
                        messaging.destination.name = destination.name(),
                        %error,
                        retry_in = ?pause,
                        "receive failed; retrying"
                    );
                } else {
                    tracing::error!(
                        messaging.system = destination.system(),
                        messaging.destination.name = destination.name(),
                        %error,
                        retry_in = ?pause,
                        "receive failed with an error a retry may not fix; retrying"
                    );
                }
                paused_until = Some(tokio::time::Instant::now() + pause);
            }
        }
    };

    // A transport whose receive is cancel-safe loses nothing when the calls are dropped.
    let pending = if subscriber.receive_is_cancel_safe() {
        FuturesUnordered::new()
    } else {
        polls
    };
    let receiving = finish_receiving(&shared, pending);
    drain(&shared, tasks, receiving).await;
    shared.stats.summary(stopped)
}

/// What the run loop waits for.
enum PollEvent {
    Done(
        (
            crate::Result<Vec<Delivery>>,
            Vec<OwnedSemaphorePermit>,
            Instant,
        ),
    ),
    Slots(Option<Vec<OwnedSemaphorePermit>>),
    PauseOver,
}

/// Lets the receive calls in progress at shutdown finish in a task, and releases whatever
/// they return; marks receiving as ended as soon as the last call returns.
///
/// Dropping a call would not stop it: an SQS long poll goes on at the broker after the
/// client hangs up, and the messages it takes (including ones this consumer releases while
/// shutting down) would stay invisible until their visibility timeout. Letting it finish
/// costs at most the receive wait; [`drain`] waits for it until the deadline.
fn finish_receiving<H: Handler>(
    shared: &Arc<Shared<H>>,
    mut pending: FuturesUnordered<Poll>,
) -> Option<tokio::task::JoinHandle<()>> {
    if pending.is_empty() {
        shared.receiving_ended.cancel();
        return None;
    }
    let shared = shared.clone();
    let finish = async move {
        let mut batches = Vec::new();
        while let Some((received, _permits, _)) = pending.next().await {
            if let Ok(batch) = received {
                batches.push(batch);
            }
        }
        shared.receiving_ended.cancel();
        let releases = batches.into_iter().flatten().map(|delivery| {
            bump(&shared.stats.received);
            shared.instruments.received.increment(1);
            let span = process_span(&shared.settings.destination, &delivery);
            settle(&shared, delivery, Outcome::NotStarted(Duration::ZERO)).instrument(span)
        });
        futures::future::join_all(releases).await;
    };
    Some(tokio::spawn(finish.with_current_subscriber()))
}

/// Waits for at least `least` free slots and takes up to `batch` (the subscriber's
/// [`Subscriber::receive_batch`]), one permit per slot; `None` if the semaphore is closed.
async fn free_slots(
    slots: &Arc<Semaphore>,
    least: usize,
    batch: usize,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let least = least.clamp(1, batch);
    let mut taken = slots.clone().acquire_many_owned(least as u32).await.ok()?;
    while taken.num_permits() < batch {
        match slots.clone().try_acquire_owned() {
            Ok(permit) => taken.merge(permit),
            Err(_) => break,
        }
    }
    let mut permits = Vec::with_capacity(taken.num_permits());
    while let Some(permit) = taken.split(1) {
        permits.push(permit);
    }
    Some(permits)
}

/// What [`drain`] waits for next.
enum DrainEvent {
    Joined(Result<(), tokio::task::JoinError>),
    ReceivingFinished(Result<(), tokio::task::JoinError>),
    DeadlinePassed,
}

/// Waits for the delivery tasks and a receive call still in progress (see
/// [`finish_receiving`]) until the shutdown deadline; then stops the rest and leaves them
/// to finish in the background.
async fn drain<H: Handler>(
    shared: &Shared<H>,
    mut tasks: JoinSet<()>,
    mut receiving: Option<tokio::task::JoinHandle<()>>,
) {
    let deadline = tokio::time::Instant::now() + shared.settings.shutdown_timeout;
    while !tasks.is_empty() || receiving.is_some() {
        let event = {
            let receiving_finished = async {
                match receiving.as_mut() {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => DrainEvent::Joined(joined),
                finished = receiving_finished => DrainEvent::ReceivingFinished(finished),
                () = tokio::time::sleep_until(deadline) => DrainEvent::DeadlinePassed,
            }
        };
        match event {
            DrainEvent::Joined(joined) => report_task_failure(joined),
            DrainEvent::ReceivingFinished(finished) => {
                receiving = None;
                report_task_failure(finished);
            }
            DrainEvent::DeadlinePassed => {
                let left = tasks.len() as u64;
                shared
                    .stats
                    .timed_out
                    .fetch_add(left, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    handlers = left,
                    timeout = ?shared.settings.shutdown_timeout,
                    "shutdown deadline passed: stopping the handlers still running and releasing their messages"
                );
                shared.deadline_passed.cancel();
                // They release their messages in the background; do not wait for it. The
                // receive call in progress (if any) finishes in the background too.
                tasks.detach_all();
                return;
            }
        }
    }
}

fn report_task_failure(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        // Handler panics are caught inside the task; this is a bug in the consumer itself.
        // The message was not settled and comes back when its lock expires.
        tracing::error!(%error, "a consumer task failed");
    }
}

/// Starts the task of one delivery.
fn dispatch<H: Handler>(
    shared: &Arc<Shared<H>>,
    lanes: &Lanes,
    tasks: &mut JoinSet<()>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
) {
    bump(&shared.stats.received);
    shared.instruments.received.increment(1);
    let received_at = Instant::now();
    let span = process_span(&shared.settings.destination, &delivery);
    let turn = delivery
        .message()
        .ordering_key
        .clone()
        .map(|key| lanes.enter(key));
    // Boxed where it is made: the task is a few KiB, and moved unboxed into the span,
    // the dispatcher and the runtime it would be copied at each step.
    let task = Box::pin(process(shared.clone(), delivery, received_at, turn, permit));
    tasks.spawn(task.instrument(span).with_current_subscriber());
}

/// How far a delivery got.
enum Outcome {
    /// Not started (shutdown, or behind an unsettled message of its key): release it,
    /// hidden for this long.
    NotStarted(Duration),
    /// Stopped at the shutdown deadline.
    Interrupted,
    /// The handler finished: its result, or the panic payload.
    Handled {
        result: std::result::Result<Result<(), HandlerError>, Box<dyn Any + Send>>,
        took: Duration,
    },
}

/// Waits for the delivery's turn, runs the handler while renewing the lock, settles.
async fn process<H: Handler>(
    shared: Arc<Shared<H>>,
    mut delivery: Delivery,
    received_at: Instant,
    mut turn: Option<Turn>,
    _slot: OwnedSemaphorePermit,
) {
    let message = delivery.message().clone();
    let context = Context::new(&delivery, shared.settings.retry.attempts());
    let outcome = {
        let renew = keep_locked(&mut delivery, &shared.settings.renewal, received_at);
        tokio::pin!(renew);
        let next = match turn.as_mut() {
            None => Next::Go,
            Some(turn) => tokio::select! {
                biased;
                next = turn.wait() => next,
                () = shared.shutdown.cancelled() => Next::Release(Duration::ZERO),
                never = &mut renew => match never {},
            },
        };
        if let Next::Release(hidden) = next {
            Outcome::NotStarted(hidden)
        } else if shared.shutdown.is_cancelled() {
            Outcome::NotStarted(Duration::ZERO)
        } else {
            let started = Instant::now();
            let handled = AssertUnwindSafe(shared.handler.handle(message, context)).catch_unwind();
            tokio::select! {
                biased;
                result = handled => Outcome::Handled { result, took: started.elapsed() },
                () = shared.deadline_passed.cancelled() => Outcome::Interrupted,
                never = &mut renew => match never {},
            }
        }
    };
    let next = settle(&shared, delivery, outcome).await;
    if let Some(turn) = turn {
        turn.finish(next);
    }
}

/// What to do with a delivery.
enum Settlement {
    Ack,
    Retry {
        delay: Duration,
        error: String,
    },
    DeadLetter {
        reason: String,
        description: String,
    },
    /// Nack without handling, hidden for this long (zero: at once).
    Release(Duration),
}

/// Settles a delivery from its outcome. Returns what the next message of its ordering key
/// may do: go when this one is settled for good (acked or dead-lettered), else be released
/// hidden for as long as this one.
async fn settle<H: Handler>(shared: &Shared<H>, delivery: Delivery, outcome: Outcome) -> Next {
    let span = tracing::Span::current();
    let stats = &shared.stats;
    let instruments = &shared.instruments;
    let attempt = delivery.delivery_count();
    let settlement = match outcome {
        Outcome::NotStarted(hidden) => Settlement::Release(hidden),
        Outcome::Interrupted => Settlement::Release(Duration::ZERO),
        Outcome::Handled { result, took } => {
            bump(&stats.handled);
            let (kind, settlement) = match result {
                Ok(Ok(())) => (HandlerOutcome::Ok, Settlement::Ack),
                Ok(Err(error)) if !error.is_transient() => (
                    HandlerOutcome::Permanent,
                    Settlement::DeadLetter {
                        reason: error.reason().to_string(),
                        description: error.to_string(),
                    },
                ),
                Ok(Err(error)) => (
                    HandlerOutcome::Transient,
                    retry_or_give_up(shared, attempt, error.reason(), error.to_string()),
                ),
                Err(panic) => {
                    bump(&stats.panicked);
                    let text = format!("the handler panicked: {}", panic_text(panic.as_ref()));
                    (
                        HandlerOutcome::Panic,
                        retry_or_give_up(shared, attempt, RETRIES_EXHAUSTED, text),
                    )
                }
            };
            instruments.handler_duration(kind, took);
            if !matches!(kind, HandlerOutcome::Ok) {
                span.record("error.type", handler_outcome_name(kind));
                span.record("otel.status_code", "ERROR");
            }
            settlement
        }
    };

    let (name, result, next) = match settlement {
        Settlement::Ack => ("ack", delivery.ack().await, Next::Go),
        Settlement::Retry { delay, error } => {
            tracing::warn!(attempt, retry_in = ?delay, error, "handler failed; retrying later");
            ("nack", delivery.nack(delay).await, Next::Release(delay))
        }
        Settlement::DeadLetter {
            reason,
            description,
        } => {
            let description = truncate(description, MAX_DESCRIPTION);
            tracing::warn!(attempt, reason, description, "dead-lettering the message");
            (
                "dead_letter",
                delivery.dead_letter(&reason, &description).await,
                Next::Go,
            )
        }
        Settlement::Release(hidden) => {
            if shared.shutdown.is_cancelled() {
                // A receive call of this consumer still in progress would take the
                // message back and hide it; release it once none is (bounded by the
                // receive wait).
                shared.receiving_ended.cancelled().await;
            }
            (
                "release",
                delivery.nack(hidden).await,
                Next::Release(hidden),
            )
        }
    };
    span.record("cloudbus.settlement", name);
    match result {
        Ok(()) => {
            let (counter, metric) = match name {
                "ack" => (&stats.acked, &instruments.acked),
                "nack" => (&stats.nacked, &instruments.nacked),
                "dead_letter" => (&stats.dead_lettered, &instruments.dead_lettered),
                _ => (&stats.released, &instruments.released),
            };
            bump(counter);
            metric.increment(1);
            next
        }
        Err(error) => {
            bump(&stats.settle_failed);
            tracing::warn!(%error, settlement = name, "settling the message failed; the broker will redeliver it");
            Next::Release(Duration::ZERO)
        }
    }
}

/// Nack with backoff, or dead-letter on the last attempt.
fn retry_or_give_up<H>(shared: &Shared<H>, attempt: u32, reason: &str, text: String) -> Settlement {
    let policy = &shared.settings.retry;
    if attempt >= policy.attempts() {
        Settlement::DeadLetter {
            reason: reason.to_string(),
            description: format!("attempt {attempt} of {}: {text}", policy.attempts()),
        }
    } else {
        Settlement::Retry {
            delay: policy.delay_with_jitter(attempt),
            error: text,
        }
    }
}

fn handler_outcome_name(outcome: HandlerOutcome) -> &'static str {
    match outcome {
        HandlerOutcome::Ok => "ok",
        HandlerOutcome::Transient => "transient",
        HandlerOutcome::Permanent => "permanent",
        HandlerOutcome::Panic => "panic",
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "(a panic payload that is not text)"
    }
}

/// Cuts `text` to at most `max` bytes, on a character boundary, marking the cut.
fn truncate(mut text: String, max: usize) -> String {
    const MARK: &str = "…";
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}

async fn release_extra(delivery: Delivery) {
    if let Err(error) = delivery.nack(Duration::ZERO).await {
        tracing::warn!(%error, "releasing an extra message failed; it comes back when its lock expires");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_characters_whole() {
        assert_eq!(truncate("short".into(), 10), "short");
        let cut = truncate("ééééé".into(), 8);
        assert!(cut.len() <= 8 && cut.ends_with('…'), "{cut}");
        assert!(cut.starts_with('é'));
    }

    #[test]
    fn panic_payloads_become_text() {
        let caught = std::panic::catch_unwind(|| panic!("boom {}", 7)).expect_err("panics");
        assert_eq!(panic_text(caught.as_ref()), "boom 7");
    }
}
