//! `cloudbus dlq`: the dead letters of a queue or subscription, grouped by reason; and
//! `cloudbus dlq redrive`, which moves them back: publish the copy first, remove the dead
//! letter after, so that a crash in between leaves a duplicate and never loses one.

use std::collections::BTreeMap;

use cloudbus::subscriber::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE};

use crate::RedriveArgs;
use crate::exit::{Failure, PARTIAL};
use crate::input::from_record;
use crate::output::{Columns, Output, Record, table};
use crate::target::Target;

use super::peek::look;
use super::{Held, close, receive_until, subscriber};

/// The dead-letter queue of `target`.
fn dead_letters(target: &Target) -> Result<Target, Failure> {
    let config = target
        .config
        .dead_letter_queue()
        .map_err(|e| Failure::of("finding the dead-letter queue of", &target.shown, e))?;
    Ok(target.derived(config, "the dead-letter queue"))
}

/// Lists up to `max` dead letters, then the count per reason (on standard error with
/// `--json`, so that standard output holds only messages).
pub async fn list(target: Target, max: usize, output: &Output) -> Result<u8, Failure> {
    let dlq = dead_letters(&target)?;
    let records = look(&dlq, max, output).await?;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for record in &records {
        output.message(record, Columns::DeadLetters);
        *reasons.entry(record.reason().to_string()).or_default() += 1;
    }
    let mut by_count: Vec<(String, usize)> = reasons.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if output.json {
        let summary: Vec<String> = by_count.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        output.note(&format!(
            "{} dead letters in {} ({})",
            records.len(),
            dlq.shown,
            summary.join(", ")
        ));
    } else {
        println!();
        let rows: Vec<Vec<String>> = by_count
            .iter()
            .map(|(reason, count)| vec![reason.clone(), count.to_string()])
            .collect();
        table(&["REASON", "COUNT"], &rows);
        if records.len() >= max {
            output.note(&format!("(showing the first {max}; --max shows more)"));
        }
    }
    Ok(0)
}

/// Moves dead letters back to where they came from (or to `--to`).
pub async fn redrive(target: Target, args: &RedriveArgs, output: &Output) -> Result<u8, Failure> {
    let dlq = dead_letters(&target)?;
    let destination = match &args.to {
        Some(url) => Target::from_url(url)?,
        None => {
            let config = target
                .config
                .redrive_target()
                .map_err(|e| Failure::of("finding where to redrive", &target.shown, e))?;
            target.derived(config, "the origin")
        }
    };
    if args.dry_run {
        return dry_run(&dlq, &destination, args, output).await;
    }
    let total = match (args.max, dead_letter_count(&target).await) {
        (Some(max), Some(count)) => Some(max.min(count)),
        (max, count) => max.or(count).filter(|_| args.reason.is_none()),
    };
    let publisher = destination
        .config
        .connect_publisher()
        .await
        .map_err(|e| Failure::of("connecting to", &destination.shown, e))?;
    let subscriber = subscriber(&dlq).await?;
    let progress = output.progress(total, "redriving");
    let mut held = Held::default();
    let (mut moved, mut failed, mut skipped) = (0u64, 0u64, 0u64);
    let max = args.max.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    // Without a reason filter every delivery counts against --max, so receiving can stop
    // there; with one, the others are held until the quiet spell ends.
    let outcome = receive_until(
        subscriber.as_ref(),
        max.filter(|_| args.reason.is_none()),
        args.idle_timeout,
        false,
        &mut held,
        async |delivery, held: &mut Held| {
            let record = Record::of_delivery(&delivery);
            let wanted = args.reason.as_deref().is_none_or(|r| r == record.reason());
            let room = max.is_none_or(|max| (moved + failed) < max as u64);
            if !wanted || !room {
                skipped += 1;
                held.hold(delivery);
                return Ok(());
            }
            let copy = redriven(&record)?;
            match publisher.publish(copy).await {
                Ok(_) => match delivery.ack().await {
                    Ok(()) => {
                        held.remember(&record.id);
                        moved += 1;
                        progress.suspend(|| output.message(&record, Columns::DeadLetters));
                    }
                    Err(error) => {
                        failed += 1;
                        held.remember(&record.id);
                        progress.suspend(|| {
                            output.note(&format!(
                                "cloudbus: {} was published to {} but is still in the \
                                 dead-letter queue ({error}): it will be redriven again",
                                record.id, destination.shown
                            ))
                        });
                    }
                },
                Err(error) => {
                    failed += 1;
                    progress.suspend(|| {
                        output.note(&format!(
                            "cloudbus: {} stays in the dead-letter queue: publishing it to {} \
                             failed: {error}",
                            record.id, destination.shown
                        ))
                    });
                    held.hold(delivery);
                }
            }
            progress.inc(1);
            Ok(())
        },
        &dlq.shown,
    )
    .await;
    progress.finish_and_clear();
    held.release(output).await;
    close(subscriber, output).await;
    if let Err(error) = publisher.close().await {
        output.note(&format!("cloudbus: closing the publisher: {error}"));
    }
    outcome?;
    output.note(&format!(
        "moved {moved} dead letters from {} to {}{}{}",
        dlq.shown,
        destination.shown,
        if skipped > 0 {
            format!("; {skipped} left (other reasons, or past --max)")
        } else {
            String::new()
        },
        if failed > 0 {
            format!("; {failed} failed")
        } else {
            String::new()
        }
    ));
    Ok(if failed > 0 { PARTIAL } else { 0 })
}

/// The attribute that keeps, on a redriven copy, the reason it had been dead-lettered for.
pub const REDRIVEN_REASON: &str = "RedrivenReason";
/// The attribute that keeps, on a redriven copy, the dead-letter description.
pub const REDRIVEN_DESCRIPTION: &str = "RedrivenDescription";
/// The attribute that keeps, on a redriven copy, when the broker first took the message
/// (RFC 3339; kept from an earlier redrive).
pub const ORIGINAL_ENQUEUED_AT: &str = "OriginalEnqueuedAt";

/// The copy a redrive publishes: the same id, body and attributes, with the dead-letter
/// attributes turned into history (`RedrivenReason`, `RedrivenDescription`,
/// `OriginalEnqueuedAt`), so that a consumer does not take it for a dead letter and an
/// operator can still see what happened.
fn redriven(record: &Record) -> Result<cloudbus::Message, Failure> {
    let mut copy = from_record(record.clone(), 0)?;
    let attributes = &mut copy.attributes;
    let reason = attributes.remove(DEAD_LETTER_REASON);
    let description = attributes.remove(DEAD_LETTER_DESCRIPTION);
    attributes.remove(DEAD_LETTER_SOURCE);
    if let Some(reason) = reason {
        attributes.insert(REDRIVEN_REASON.into(), reason);
    }
    match description {
        Some(description) if !description.is_empty() => {
            attributes.insert(REDRIVEN_DESCRIPTION.into(), description);
        }
        _ => {}
    }
    if let Some(enqueued_at) = &record.enqueued_at {
        attributes
            .entry(ORIGINAL_ENQUEUED_AT.into())
            .or_insert_with(|| enqueued_at.clone());
    }
    Ok(copy)
}

/// How many dead letters the transport says there are, when it says.
async fn dead_letter_count(target: &Target) -> Option<u64> {
    let inspector = target.config.connect_inspector().await.ok()?;
    let stats = inspector.stats().await.ok();
    let _ = inspector.close().await;
    stats?.dead_lettered
}

/// What a redrive would move, looked at without moving anything (peeked where the
/// transport can).
async fn dry_run(
    dlq: &Target,
    destination: &Target,
    args: &RedriveArgs,
    output: &Output,
) -> Result<u8, Failure> {
    let max = args
        .max
        .map_or(1000, |m| usize::try_from(m).unwrap_or(usize::MAX));
    let records = look(dlq, max, output).await?;
    let mut would = 0;
    for record in &records {
        if args.reason.as_deref().is_none_or(|r| r == record.reason()) {
            output.message(record, Columns::DeadLetters);
            would += 1;
        }
    }
    output.note(&format!(
        "dry run: would move {would} of the {} dead letters looked at from {} to {}",
        records.len(),
        dlq.shown,
        destination.shown
    ));
    Ok(0)
}
