//! The commands, and what they share: receiving until a count or a quiet spell, holding
//! deliveries to give back at the end, and stopping on ctrl-c.

mod dlq;
mod peek;
mod receive;
mod send;
mod stats;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cloudbus::{Delivery, Subscriber};

use crate::exit::Failure;
use crate::output::Output;
use crate::target::{Target, resolve};
use crate::{Cli, Command, DlqCommand, TargetArgs};

/// Runs the command; the exit code on success (0, or [`PARTIAL`](crate::exit::PARTIAL)).
pub async fn run(cli: Cli, output: &Output) -> Result<u8, Failure> {
    let given = TargetArgs {
        url: cli.url.clone(),
        config: cli.config.clone(),
    };
    let target = |url: &Option<String>| resolve(url.as_deref(), &given);
    match &cli.command {
        Command::Send(args) => {
            // With --url, CLOUDBUS_URL or --config, a first argument that is not a URL is a
            // body.
            let mut bodies = args.body.clone();
            let url = match &args.target {
                Some(first)
                    if !first.contains("://")
                        && (given.url.is_some() || given.config.is_some()) =>
                {
                    bodies.insert(0, first.clone());
                    None
                }
                url => url.clone(),
            };
            send::run(target(&url)?, args, bodies, output).await
        }
        Command::Receive(args) => receive::run(target(&args.target)?, args, output).await,
        Command::Peek(args) => peek::run(target(&args.target)?, args.max, output).await,
        Command::Stats(args) => stats::run(target(&args.target)?, output).await,
        Command::Dlq(args) => match &args.redrive {
            None => dlq::list(target(&args.target)?, args.max, output).await,
            Some(DlqCommand::Redrive(redrive)) => {
                dlq::redrive(target(&redrive.target)?, redrive, output).await
            }
        },
    }
}

/// Set by ctrl-c: commands finish the call in progress, settle what they hold and stop.
fn interrupted() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            set.store(true, Ordering::SeqCst);
        }
    });
    flag
}

/// The longest single receive call: ctrl-c takes at most this long to act.
const RECEIVE_SLICE: Duration = Duration::from_secs(2);

/// Receives from `subscriber` until `max` deliveries, `idle` without one (unless
/// `follow`), or ctrl-c; hands each new delivery to `each`. A delivery seen before (its
/// lock ran out while held) is held again, not handed over twice.
async fn receive_until(
    subscriber: &dyn Subscriber,
    max: Option<usize>,
    idle: Duration,
    follow: bool,
    held: &mut Held,
    mut each: impl AsyncFnMut(Delivery, &mut Held) -> Result<(), Failure>,
    shown: &str,
) -> Result<usize, Failure> {
    let stop = interrupted();
    let mut handed = 0;
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) && max.is_none_or(|max| handed < max) {
        let quiet = last.elapsed();
        if !follow && quiet >= idle {
            break;
        }
        let wait = if follow {
            RECEIVE_SLICE
        } else {
            (idle - quiet).min(RECEIVE_SLICE)
        };
        let want = max.map_or(10, |max| (max - handed).min(10));
        let deliveries = subscriber
            .receive(want, wait)
            .await
            .map_err(|e| Failure::of("receiving from", shown, e))?;
        for delivery in deliveries {
            if held.seen(&delivery) {
                // Its lock ran out while held: not news, so the quiet spell goes on.
                held.hold(delivery);
                continue;
            }
            last = Instant::now();
            if max.is_some_and(|max| handed >= max) {
                held.hold(delivery);
                continue;
            }
            handed += 1;
            each(delivery, held).await?;
        }
    }
    Ok(handed)
}

/// Deliveries kept unsettled until the command ends, then given back (nack without delay),
/// so that a command that gives messages back never receives one of them twice; and the
/// ids of messages a command dealt with and may meet again (a redriven dead letter that is
/// dead-lettered again during the run). Only those: `receive --follow` that acks remembers
/// nothing, so its memory stays flat.
#[derive(Default)]
struct Held {
    deliveries: Vec<Delivery>,
    seen: HashSet<String>,
}

impl Held {
    /// Whether this message was held or remembered before.
    fn seen(&self, delivery: &Delivery) -> bool {
        self.seen.contains(&delivery.message().id)
    }

    /// Remembers a message dealt with, so that meeting it again in this run is skipped.
    fn remember(&mut self, id: &str) {
        self.seen.insert(id.to_string());
    }

    fn hold(&mut self, delivery: Delivery) {
        self.remember(&delivery.message().id);
        self.deliveries.push(delivery);
    }

    /// Gives every held delivery back. A give-back that fails leaves the message to come
    /// back when its lock runs out: reported, not fatal.
    async fn release(self, output: &Output) {
        for delivery in self.deliveries {
            let id = delivery.message().id.clone();
            if let Err(error) = delivery.nack(Duration::ZERO).await {
                output.note(&format!(
                    "cloudbus: could not give back {id} ({error}); it comes back when its lock \
                     runs out"
                ));
            }
        }
    }
}

/// Opens a subscriber, naming the target in the error.
async fn subscriber(target: &Target) -> Result<Box<dyn Subscriber>, Failure> {
    target
        .config
        .connect_subscriber()
        .await
        .map_err(|e| Failure::of("connecting to", &target.shown, e))
}

/// Closes a subscriber; a failure to close after the work is done is only reported.
async fn close(subscriber: Box<dyn Subscriber>, output: &Output) {
    if let Err(error) = subscriber.close().await {
        output.note(&format!("cloudbus: closing the subscriber: {error}"));
    }
}
