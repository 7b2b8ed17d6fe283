//! `cloudbus`: send, receive, peek, inspect and redrive dead letters on any cloudbus
//! transport, configured as the library is (a URL, `CLOUDBUS_URL` or a TOML config file,
//! and each transport's usual environment).
//!
//! ```sh
//! cloudbus send sqs://orders?endpoint=http://127.0.0.1:4566 hello world
//! cloudbus receive sqs://orders?endpoint=http://127.0.0.1:4566 --max 10
//! cloudbus dlq servicebus://orders
//! cloudbus dlq redrive servicebus://orders --reason HandlerFailed --dry-run
//! ```
//!
//! Exit codes: see [`exit`].

mod commands;
mod exit;
mod input;
mod output;
mod target;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The command line.
#[derive(Parser)]
#[command(
    name = "cloudbus",
    version,
    about = "Send, receive, peek, inspect and redrive dead letters on any cloudbus transport",
    after_help = "URLs are the library's: memory://, sqs://, sns://, servicebus://, kafka://, \
                  rabbitmq:// with their options (see the README's configuration table). \
                  Secrets come from the transports' environment, never from a URL."
)]
struct Cli {
    /// The queue, topic or subscription, as a cloudbus URL (instead of the positional URL).
    #[arg(long, global = true, env = "CLOUDBUS_URL", hide_env_values = true)]
    url: Option<String>,
    /// A TOML file with the library's serde config (a `transport` key, at the top or in
    /// one table), instead of a URL.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where to work when the command names no URL: `--url` (or `CLOUDBUS_URL`), or a config
/// file. (Global options are fields of [`Cli`] itself: clap does not carry global options
/// through a flattened struct into subcommands.)
#[derive(Clone, Debug)]
struct TargetArgs {
    url: Option<String>,
    config: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Publishes messages: the BODY arguments, else one per line of standard input; prints
    /// their ids.
    Send(SendArgs),
    /// Receives messages and prints them; acks each (or, with --release, gives them back).
    Receive(ReceiveArgs),
    /// Shows messages without consuming them where the transport can (memory, Service Bus,
    /// Kafka); elsewhere says what it does instead and receives and releases them.
    Peek(PeekArgs),
    /// Lists the dead-lettered messages of a queue or subscription, grouped by reason;
    /// `dlq redrive` moves them back.
    Dlq(DlqArgs),
    /// What the transport reports: messages waiting, in flight, dead-lettered, oldest age.
    Stats(UrlArg),
}

#[derive(Args)]
struct UrlArg {
    /// The queue, topic or subscription (a cloudbus URL); or --url, CLOUDBUS_URL, --config.
    #[arg(value_name = "URL")]
    target: Option<String>,
}

#[derive(Args)]
struct SendArgs {
    /// The queue or topic (a cloudbus URL).
    #[arg(value_name = "URL")]
    target: Option<String>,
    /// Message bodies; without any, one message per line of standard input.
    body: Vec<String>,
    /// An attribute on every message, `key=value` (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE")]
    attributes: Vec<String>,
    /// The bodies (arguments or lines) are base64: for binary payloads.
    #[arg(long)]
    base64: bool,
    /// Each input line is a message as `receive --json` prints it (id, body or
    /// body_base64, attributes, ...): moves messages between queues and transports.
    #[arg(long)]
    from_json: bool,
    /// Sends N generated messages (the body: the one BODY argument, else `message <i>`),
    /// with a progress bar.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Publishes in flight at once (the transport batches concurrent publishes).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

#[derive(Args)]
struct ReceiveArgs {
    /// The queue or subscription (a cloudbus URL).
    #[arg(value_name = "URL")]
    target: Option<String>,
    /// Ack each message once printed (the default).
    #[arg(long, conflicts_with = "release")]
    ack: bool,
    /// Give each message back instead (its delivery count grows); messages are held until
    /// the command ends, so none is printed twice.
    #[arg(long)]
    release: bool,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Stop when nothing arrived for this long (`5s`, `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    idle_timeout: Duration,
    /// Keep receiving until interrupted (ctrl-c), however long it is quiet.
    #[arg(long)]
    follow: bool,
}

#[derive(Args)]
struct PeekArgs {
    /// The queue or subscription (a cloudbus URL).
    #[arg(value_name = "URL")]
    target: Option<String>,
    /// How many messages to show.
    #[arg(long, default_value_t = 10)]
    max: usize,
}

#[derive(Args)]
struct DlqArgs {
    #[command(subcommand)]
    redrive: Option<DlqCommand>,
    /// The queue or subscription whose dead letters to list (a cloudbus URL).
    #[arg(value_name = "URL")]
    target: Option<String>,
    /// How many dead letters to look at.
    #[arg(long, default_value_t = 1000)]
    max: usize,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Moves dead letters back to the queue or subscription they came from: each is
    /// published there first and removed from the dead-letter queue after, so a crash in
    /// between leaves a duplicate, never a loss.
    Redrive(RedriveArgs),
}

#[derive(Args)]
struct RedriveArgs {
    /// The queue or subscription whose dead letters to move (a cloudbus URL).
    #[arg(value_name = "URL")]
    target: Option<String>,
    /// Only dead letters with this reason; the others stay.
    #[arg(long)]
    reason: Option<String>,
    /// Move at most this many.
    #[arg(long)]
    max: Option<u64>,
    /// Say what would move, and move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Publish to this URL instead of the origin: for a subscription whose transport can
    /// only publish to the topic (Service Bus, Kafka, memory), name the topic on purpose.
    #[arg(long, value_name = "URL")]
    to: Option<String>,
    /// Stop when the dead-letter queue gave nothing for this long.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    idle_timeout: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .or_else(|_| text.parse::<f64>().map(Duration::from_secs_f64))
        .map_err(|_| format!("`{text}` is not a duration: write `5s`, `500ms` or `2m`"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cloudbus: cannot start the runtime: {error}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let output = output::Output::new(cli.json);
    match runtime.block_on(commands::run(cli, &output)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("{failure}");
            ExitCode::from(failure.code())
        }
    }
}
