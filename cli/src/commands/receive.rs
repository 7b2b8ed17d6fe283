//! `cloudbus receive`: prints messages as they arrive and acks each once printed, or with
//! `--release` holds them and gives them all back at the end.

use crate::ReceiveArgs;
use crate::exit::Failure;
use crate::output::{Columns, Output, Record};
use crate::target::Target;

use super::{Held, close, receive_until, subscriber};

pub async fn run(target: Target, args: &ReceiveArgs, output: &Output) -> Result<u8, Failure> {
    if args.max == Some(0) {
        return Ok(0);
    }
    let subscriber = subscriber(&target).await?;
    let mut held = Held::default();
    let release = args.release;
    let shown = target.shown.clone();
    let outcome = receive_until(
        subscriber.as_ref(),
        args.max,
        args.idle_timeout,
        args.follow,
        &mut held,
        async |delivery, held: &mut Held| {
            output.message(&Record::of_delivery(&delivery), Columns::Messages);
            if release {
                held.hold(delivery);
                return Ok(());
            }
            delivery
                .ack()
                .await
                .map_err(|e| Failure::of("acking a message of", &shown, e))
        },
        &target.shown,
    )
    .await;
    held.release(output).await;
    close(subscriber, output).await;
    let received = outcome?;
    if !output.json {
        let verb = if release {
            "received and gave back"
        } else {
            "received and acked"
        };
        output.note(&format!("{verb} {received} messages from {}", target.shown));
    }
    Ok(0)
}
