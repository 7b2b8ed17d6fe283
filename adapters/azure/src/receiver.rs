//! The task that owns one receiver link: it receives, settles what it received (AMQP settles
//! on the receiving link), renews locks it was asked to hold (`extend`, and a delayed
//! `nack`), slices long receive waits so that settlements never wait long behind an idle
//! receive, and for session-enabled entities takes sessions from the accepter task
//! ([`crate::sessions`]).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant, SystemTime};

use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{ServiceBusReceivedMessage, ServiceBusReceiver, ServiceBusSessionReceiver};
use cloudbus_core::driver::DeliveryInfo;
use cloudbus_core::{Delivery, Error, Result};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::TRANSPORT;
use crate::config::ServiceBusConfig;
use crate::credentials::Client;
use crate::error::{closed, is_lock_lost, lock_lost, map_error};
use crate::mapping::from_servicebus;
use crate::settle::ServiceBusSettle;
use crate::subscriber::open_receivers;

/// The longest a receive waits in one call to the client, so that settlements queued
/// behind it wait at most this long.
const RECEIVE_SLICE: Duration = Duration::from_millis(500);
/// After the first message of a receive, how long to wait for more.
const FOLLOW_UP_WAIT: Duration = Duration::from_millis(10);
/// How often the receiver's task looks at locks to renew and delayed nacks to release.
const MAINTENANCE: Duration = Duration::from_millis(250);
/// A session not received from for this long is released (once its deliveries are settled).
const SESSION_IDLE: Duration = Duration::from_secs(1);
/// Renew a held lock when it has less than this left.
const RENEW_MARGIN: Duration = Duration::from_secs(2);

pub(crate) enum Command {
    Receive {
        max: usize,
        wait: Duration,
        reply: oneshot::Sender<Result<Vec<Delivery>>>,
    },
    Settle {
        token: uuid::Uuid,
        how: Settlement,
        reply: oneshot::Sender<Result<SystemTime>>,
    },
    Close(oneshot::Sender<()>),
}

pub(crate) enum Settlement {
    Complete,
    Abandon,
    /// Keep locked until the delay passed, then abandon.
    AbandonAfter(Duration),
    DeadLetter {
        reason: String,
        description: String,
    },
    /// Keep locked for this long from now.
    Extend(Duration),
}

/// The receivers a subscriber task owns.
pub(crate) enum Receivers {
    Plain(Box<ServiceBusReceiver>),
    /// After shutdown.
    Closed,
    Sessions {
        /// Asks the accepter task for a session.
        want: mpsc::Sender<()>,
        /// A session was asked for and not yet handed over.
        requested: bool,
        /// Sessions locked by the accepter task, handed over one at a time.
        accepted: mpsc::Receiver<Result<ServiceBusSessionReceiver>>,
        accepter: tokio::task::JoinHandle<()>,
        /// Receiving from one given session only.
        pinned: bool,
        /// The session being received from.
        current: Option<Box<ServiceBusSessionReceiver>>,
        /// Sessions no longer received from, kept until their deliveries are settled.
        draining: Vec<ServiceBusSessionReceiver>,
    },
}

/// A received, unsettled message.
struct InFlight {
    message: ServiceBusReceivedMessage,
    /// The session it came from (its receiver settles it).
    session: Option<String>,
    /// Keep the lock until then (extend, or a delayed nack).
    hold_until: Option<Instant>,
    /// Abandon when the hold ends (a delayed nack).
    abandon_after_hold: bool,
}

pub(crate) struct ReceiverTask {
    /// What to reconnect to after a failure of the client.
    config: ServiceBusConfig,
    /// The connection; `None` once shut down.
    client: Option<Client>,
    path: String,
    sessions: bool,
    receivers: Receivers,
    in_flight: HashMap<uuid::Uuid, InFlight>,
    /// For building deliveries; weak, so dropping the subscriber ends the task.
    commands: mpsc::WeakSender<Command>,
    /// Commands that arrived while a receive was in progress.
    backlog: VecDeque<Command>,
    /// When a receive last ended: a session not received from for a while is released.
    last_receive: Instant,
}

/// One settlement operation on whichever receiver owns the message.
macro_rules! on_receiver {
    ($task:expr, $session:expr, |$r:ident| $body:expr) => {{
        match &mut $task.receivers {
            Receivers::Closed => None,
            Receivers::Plain($r) => Some($body),
            Receivers::Sessions {
                current, draining, ..
            } => {
                let owner = current
                    .iter_mut()
                    .map(|r| &mut **r)
                    .chain(draining.iter_mut())
                    .find(|r| Some(r.session_id()) == $session.as_deref());
                match owner {
                    Some($r) => Some($body),
                    None => None,
                }
            }
        }
    }};
}

/// Receives on a plain or session receiver: waits up to `slice` for the first message,
/// then takes whatever else is there at once (the client waits for all `max` otherwise).
macro_rules! quick_receive {
    ($receiver:expr, $max:expr, $slice:expr, $path:expr) => {{
        async {
            let mut got = $receiver
                .receive_messages_with_max_wait_time(1, $slice)
                .await
                .map_err(|e| map_error("receive", &e, "queue", $path))?;
            if !got.is_empty() && $max > 1 {
                let more = $receiver
                    .receive_messages_with_max_wait_time($max - 1, FOLLOW_UP_WAIT)
                    .await
                    .map_err(|e| map_error("receive", &e, "queue", $path))?;
                got.extend(more);
            }
            Ok::<_, Error>(got)
        }
        .await
    }};
}

impl ReceiverTask {
    /// The task of a receiver (or session receivers) that `client` opened for `config`;
    /// `commands` is the sending side of the channel it serves, for building deliveries.
    pub(crate) fn new(
        config: ServiceBusConfig,
        client: Option<Client>,
        receivers: Receivers,
        commands: mpsc::WeakSender<Command>,
    ) -> Self {
        ReceiverTask {
            path: config.path(),
            sessions: config.uses_sessions(),
            config,
            client,
            receivers,
            in_flight: HashMap::new(),
            commands,
            backlog: VecDeque::new(),
            last_receive: Instant::now(),
        }
    }

    pub(crate) async fn run(mut self, mut incoming: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(MAINTENANCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = match self.backlog.pop_front() {
                Some(command) => command,
                None => tokio::select! {
                    command = incoming.recv() => match command {
                        Some(command) => command,
                        None => break,
                    },
                    _ = tick.tick() => {
                        self.maintain().await;
                        continue;
                    }
                },
            };
            match command {
                Command::Receive { max, wait, reply } => {
                    let outcome = AssertUnwindSafe(self.receive(max, wait, &mut incoming))
                        .catch_unwind()
                        .await;
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(_) => self.recover().await,
                    };
                    let _ = reply.send(outcome);
                }
                Command::Settle { token, how, reply } => {
                    let outcome = AssertUnwindSafe(self.settle(token, how))
                        .catch_unwind()
                        .await;
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(_) => self.recover::<SystemTime>().await,
                    };
                    let _ = reply.send(outcome);
                }
                Command::Close(reply) => {
                    self.shutdown().await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
        self.shutdown().await;
    }

    /// After the client panicked: drop its state (unsettled deliveries lose their locks and
    /// are redelivered), reconnect, and report a transient error for the failed call.
    async fn recover<T>(&mut self) -> Result<T> {
        tracing::error!(
            messaging.system = "servicebus",
            messaging.destination.name = %self.path,
            "the Service Bus client panicked; reconnecting (unsettled deliveries will be redelivered)"
        );
        self.in_flight.clear();
        let _ = AssertUnwindSafe(self.shutdown()).catch_unwind().await;
        match open_receivers(&self.config).await {
            Ok((client, receivers)) => {
                self.client = client;
                self.receivers = receivers;
            }
            Err(error) => {
                tracing::error!(%error, "cannot reconnect to Service Bus; will retry on the next call");
            }
        }
        Err(Error::transport(
            TRANSPORT,
            "the Service Bus client failed internally; reconnected, please retry",
            true,
            None,
        ))
    }

    async fn shutdown(&mut self) {
        let receivers = std::mem::replace(&mut self.receivers, Receivers::Closed);
        match receivers {
            Receivers::Plain(receiver) => {
                let _ = receiver.dispose().await;
            }
            Receivers::Sessions {
                accepter,
                current,
                draining,
                ..
            } => {
                accepter.abort();
                for receiver in current.into_iter().map(|r| *r).chain(draining) {
                    let _ = receiver.dispose().await;
                }
            }
            Receivers::Closed => {}
        }
        if let Some(client) = self.client.take() {
            let _ = client.dispose().await;
        }
    }

    /// Receives up to `max` messages within `wait`, in slices, settling queued commands
    /// between slices.
    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
        incoming: &mut mpsc::Receiver<Command>,
    ) -> Result<Vec<Delivery>> {
        if matches!(self.receivers, Receivers::Closed) {
            // An earlier reconnect failed: try again.
            let (client, receivers) = open_receivers(&self.config).await?;
            self.client = client;
            self.receivers = receivers;
        }
        let deadline = Instant::now() + wait;
        loop {
            while let Ok(command) = incoming.try_recv() {
                match command {
                    Command::Settle { token, how, reply } => {
                        let _ = reply.send(self.settle(token, how).await);
                    }
                    other => self.backlog.push_back(other),
                }
            }
            self.maintain().await;
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = left.clamp(Duration::from_millis(20), RECEIVE_SLICE);
            let received = self
                .receive_slice(max.min(u32::MAX as usize) as u32, slice)
                .await;
            self.last_receive = Instant::now();
            let received = received?;
            if !received.is_empty() || Instant::now() >= deadline {
                return Ok(self.deliveries(received));
            }
        }
    }

    async fn receive_slice(
        &mut self,
        max: u32,
        slice: Duration,
    ) -> Result<Vec<(ServiceBusReceivedMessage, Option<String>)>> {
        let path = self.path.clone();
        match &mut self.receivers {
            Receivers::Closed => Err(closed("subscriber")),
            Receivers::Plain(receiver) => Ok(quick_receive!(receiver, max, slice, &path)?
                .into_iter()
                .map(|m| (m, None))
                .collect()),
            Receivers::Sessions {
                want,
                requested,
                accepted,
                pinned,
                current,
                draining,
                ..
            } => {
                if current.is_none() {
                    if !*requested {
                        *requested = want.try_send(()).is_ok();
                    }
                    match tokio::time::timeout(slice, accepted.recv()).await {
                        Err(_) => return Ok(Vec::new()),
                        Ok(None) => return Err(closed("subscriber")),
                        Ok(Some(Err(error))) => {
                            *requested = false;
                            return Err(error);
                        }
                        Ok(Some(Ok(receiver))) => {
                            *requested = false;
                            *current = Some(Box::new(receiver));
                        }
                    }
                }
                let Some(receiver) = current.as_mut() else {
                    return Ok(Vec::new());
                };
                let session = receiver.session_id().to_string();
                let got = quick_receive!(receiver, max, slice, &session)?;
                if got.is_empty() && !*pinned {
                    // The session has nothing more right now: take another one next time, and
                    // keep this one locked until its deliveries are settled (that keeps order).
                    if let Some(done) = current.take() {
                        draining.push(*done);
                    }
                }
                Ok(got
                    .into_iter()
                    .map(|m| (m, Some(session.clone())))
                    .collect())
            }
        }
    }

    fn deliveries(
        &mut self,
        received: Vec<(ServiceBusReceivedMessage, Option<String>)>,
    ) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(received.len());
        for (raw, session) in received {
            let message = from_servicebus(&raw, self.sessions);
            let token = uuid::Uuid::from_bytes(*raw.lock_token().as_inner());
            let info = DeliveryInfo {
                delivery_count: raw.delivery_count().unwrap_or(1),
                enqueued_at: raw.enqueued_time().into(),
                transport_id: raw.sequence_number().to_string(),
                locked_until: raw.locked_until().map(Into::into),
            };
            let Some(commands) = self.commands.upgrade() else {
                continue;
            };
            let settle = ServiceBusSettle {
                commands,
                token,
                message_id: message.id.clone(),
            };
            self.in_flight.insert(
                token,
                InFlight {
                    message: raw,
                    session,
                    hold_until: None,
                    abandon_after_hold: false,
                },
            );
            deliveries.push(Delivery::new(message, info, Box::new(settle)));
        }
        deliveries
    }

    async fn settle(&mut self, token: uuid::Uuid, how: Settlement) -> Result<SystemTime> {
        let Some(entry) = self.in_flight.get_mut(&token) else {
            return Err(lock_lost(&token.to_string()));
        };
        let message_id = entry
            .message
            .message_id()
            .map(|m| m.into_owned())
            .unwrap_or_default();
        match how {
            Settlement::Extend(by) => {
                entry.hold_until = Some(Instant::now() + by);
                self.renew(token).await?;
                return Ok(SystemTime::now() + by);
            }
            Settlement::AbandonAfter(delay) => {
                entry.hold_until = Some(Instant::now() + delay);
                entry.abandon_after_hold = true;
                let short = entry
                    .message
                    .locked_until()
                    .map(SystemTime::from)
                    .and_then(|l| l.duration_since(SystemTime::now()).ok())
                    .is_none_or(|left| left < RENEW_MARGIN);
                if short {
                    self.renew(token).await?;
                }
                return Ok(SystemTime::now());
            }
            _ => {}
        }
        let Some(entry) = self.in_flight.remove(&token) else {
            return Err(lock_lost(&message_id));
        };
        let session = entry.session.clone();
        let message = entry.message;
        let outcome = on_receiver!(self, session, |r| match &how {
            Settlement::Complete => r.complete_message(&message).await,
            Settlement::DeadLetter {
                reason,
                description,
            } => {
                r.dead_letter_message(
                    &message,
                    DeadLetterOptions {
                        dead_letter_reason: Some(reason.clone()),
                        dead_letter_error_description: Some(description.clone()),
                        properties_to_modify: None,
                    },
                )
                .await
            }
            _ => r.abandon_message(&message, None).await,
        });
        self.release_drained_sessions().await;
        match outcome {
            None => Err(lock_lost(&message_id)),
            Some(Ok(())) => Ok(SystemTime::now()),
            Some(Err(e)) if is_lock_lost(&e) => Err(lock_lost(&message_id)),
            Some(Err(e)) => Err(map_error("settle", &e, "queue", &self.path)),
        }
    }

    async fn renew(&mut self, token: uuid::Uuid) -> Result<()> {
        let Some(entry) = self.in_flight.get_mut(&token) else {
            return Err(lock_lost(&token.to_string()));
        };
        let session = entry.session.clone();
        let message = &mut entry.message;
        let outcome = on_receiver!(self, session, |r| r.renew_message_lock(message).await);
        match outcome {
            Some(Ok(())) => Ok(()),
            None => Err(lock_lost(&token.to_string())),
            Some(Err(e)) if is_lock_lost(&e) => {
                self.in_flight.remove(&token);
                Err(lock_lost(&token.to_string()))
            }
            Some(Err(e)) => Err(map_error("renew lock", &e, "queue", &self.path)),
        }
    }

    /// Renews held locks that are about to expire, abandons delayed nacks whose delay has
    /// passed, and forgets deliveries whose lock expired (they are redelivered).
    async fn maintain(&mut self) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut expired = Vec::new();
        let mut to_abandon = Vec::new();
        let mut to_renew = Vec::new();
        for (token, entry) in &self.in_flight {
            let locked_until: Option<SystemTime> = entry.message.locked_until().map(Into::into);
            let left = locked_until.and_then(|l| l.duration_since(wall).ok());
            let held = entry.hold_until.is_some_and(|until| until > now);
            let hold_ended = entry.hold_until.is_some_and(|until| until <= now);
            if hold_ended && entry.abandon_after_hold {
                to_abandon.push(*token);
            } else if held && left.is_none_or(|l| l < RENEW_MARGIN) {
                to_renew.push(*token);
            } else if !held && left.is_none() && locked_until.is_some() {
                expired.push(*token);
            }
        }
        for token in expired {
            self.in_flight.remove(&token);
        }
        for token in to_renew {
            if let Err(error) = self.renew(token).await {
                tracing::warn!(messaging.system = "servicebus", messaging.destination.name = %self.path, %error, "cannot renew a held lock");
            }
        }
        for token in to_abandon {
            if let Some(entry) = self.in_flight.get_mut(&token) {
                entry.hold_until = None;
            }
            if let Err(error) = self.settle(token, Settlement::Abandon).await {
                tracing::warn!(messaging.system = "servicebus", messaging.destination.name = %self.path, %error, "cannot abandon a nacked message after its delay");
            }
        }
        // Session locks: renew those of sessions we still receive from or settle in.
        if let Receivers::Sessions {
            current,
            draining,
            requested,
            accepted,
            ..
        } = &mut self.receivers
        {
            // A session asked for arrived between receives: take it now so its lock is renewed.
            if current.is_none() && *requested {
                if let Ok(Ok(receiver)) = accepted.try_recv() {
                    *requested = false;
                    *current = Some(Box::new(receiver));
                }
            }
            // Nobody receives: stop holding the session (it is released once its deliveries
            // are settled), so that other consumers can take it.
            if now.duration_since(self.last_receive) > SESSION_IDLE {
                if let Some(idle) = current.take() {
                    draining.push(*idle);
                }
            }
            for receiver in current
                .iter_mut()
                .map(|r| &mut **r)
                .chain(draining.iter_mut())
            {
                let left = SystemTime::from(receiver.session_locked_until())
                    .duration_since(wall)
                    .unwrap_or_default();
                if left < RENEW_MARGIN {
                    if let Err(error) = receiver.renew_session_lock().await {
                        tracing::warn!(messaging.system = "servicebus", session = receiver.session_id(), %error, "cannot renew a session lock");
                    }
                }
            }
        }
        // Holds that ended without an abandon (extend) just stop being renewed.
        for entry in self.in_flight.values_mut() {
            if entry.hold_until.is_some_and(|until| until <= now) && !entry.abandon_after_hold {
                entry.hold_until = None;
            }
        }
        self.release_drained_sessions().await;
    }

    /// Closes session receivers that are no longer received from and have nothing unsettled.
    async fn release_drained_sessions(&mut self) {
        let Receivers::Sessions { draining, .. } = &mut self.receivers else {
            return;
        };
        let busy: Vec<String> = self
            .in_flight
            .values()
            .filter_map(|e| e.session.clone())
            .collect();
        let (keep, release): (Vec<_>, Vec<_>) = std::mem::take(draining)
            .into_iter()
            .partition(|r| busy.iter().any(|s| s == r.session_id()));
        *draining = keep;
        for receiver in release {
            let _ = receiver.dispose().await;
        }
    }
}
