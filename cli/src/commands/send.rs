//! `cloudbus send`: publishes the BODY arguments, the lines of standard input, or `--count`
//! generated messages, several in flight at once (so the transport batches them); prints
//! each id in order.

use cloudbus::{Message, Publisher};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::SendArgs;
use crate::exit::{Failure, PARTIAL};
use crate::input::MessageInput;
use crate::output::Output;
use crate::target::Target;

/// Sends `bodies` (the BODY arguments), or what `args` says instead.
pub async fn run(
    target: Target,
    args: &SendArgs,
    bodies: Vec<String>,
    output: &Output,
) -> Result<u8, Failure> {
    let input = MessageInput::new(&args.attributes, args.base64, args.from_json)?;
    let messages: BoxStream<'static, Result<Message, Failure>> = match args.count {
        Some(count) => {
            if bodies.len() > 1 {
                return Err(Failure::usage(
                    "--count sends one body many times: give at most one BODY",
                ));
            }
            let body = bodies.first().cloned();
            let input = MessageInput::new(&args.attributes, args.base64, false)?;
            stream::iter((1..=count).map(move |i| {
                let text = body.clone().unwrap_or_else(|| format!("message {i}"));
                input.message(&text, i as usize)
            }))
            .boxed()
        }
        None if !bodies.is_empty() => stream::iter(
            bodies
                .into_iter()
                .enumerate()
                .map(move |(i, body)| input.message(&body, i + 1)),
        )
        .boxed(),
        // Lines as they come (so `cloudbus receive --follow --json | cloudbus send
        // --from-json` streams), blank ones skipped.
        None => {
            let lines = BufReader::new(tokio::io::stdin()).lines();
            stream::unfold((lines, 0usize), |(mut lines, mut number)| async move {
                loop {
                    number += 1;
                    match lines.next_line().await {
                        Ok(Some(line)) if line.trim().is_empty() => continue,
                        Ok(Some(line)) => return Some((Ok((line, number)), (lines, number))),
                        Ok(None) => return None,
                        Err(e) => {
                            let failure = Failure::usage(format!("reading standard input: {e}"));
                            return Some((Err(failure), (lines, number)));
                        }
                    }
                }
            })
            .map(move |line| line.and_then(|(line, number)| input.message(&line, number)))
            .boxed()
        }
    };
    let connected = target
        .config
        .connect_publisher()
        .await
        .map_err(|e| Failure::of("connecting to", &target.shown, e))?;
    let progress = output.progress(args.count, "sending");
    let publisher: &dyn Publisher = connected.as_ref();
    let shown = target.shown.as_str();
    let mut results = messages
        .map(|message| async move {
            match message {
                Ok(message) => {
                    let id = message.id.clone();
                    (
                        id,
                        publisher
                            .publish(message)
                            .await
                            .map_err(|e| Failure::of("publishing to", shown, e)),
                    )
                }
                Err(failure) => (String::new(), Err(failure)),
            }
        })
        .buffered(args.concurrency.max(1));
    let (mut sent, mut failed, mut last_failure) = (0u64, 0u64, None);
    let started = std::time::Instant::now();
    while let Some((id, result)) = results.next().await {
        progress.inc(1);
        match result {
            Ok(id) => {
                sent += 1;
                if output.json {
                    output.json_line(&serde_json::json!({ "id": id }));
                } else if args.count.is_none() {
                    println!("{id}");
                }
            }
            Err(failure) => {
                failed += 1;
                progress.suspend(|| {
                    output.note(&format!(
                        "{failure}{}",
                        if id.is_empty() {
                            String::new()
                        } else {
                            format!(" (message {id})")
                        }
                    ))
                });
                last_failure = Some(failure);
            }
        }
    }
    progress.finish_and_clear();
    drop(results);
    if let Err(error) = publisher.close().await {
        return Err(Failure::of(
            "closing the publisher of",
            &target.shown,
            error,
        ));
    }
    if args.count.is_some() {
        let seconds = started.elapsed().as_secs_f64();
        output.note(&format!(
            "sent {sent} messages to {} in {seconds:.1} s ({:.0}/s)",
            target.shown,
            sent as f64 / seconds.max(1e-9)
        ));
    }
    match (sent, last_failure) {
        (_, None) => Ok(0),
        (0, Some(failure)) => Err(failure),
        (_, Some(_)) => {
            output.note(&format!(
                "cloudbus: {failed} of {} messages failed",
                sent + failed
            ));
            Ok(PARTIAL)
        }
    }
}
