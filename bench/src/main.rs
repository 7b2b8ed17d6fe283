//! Benchmarks cloudbus against baselines written directly against the raw SDKs (and
//! omniqueue on SQS), in the same run:
//!
//! ```text
//! cargo run --release -p cloudbus-bench -- [--transports memory,sqs,sns,servicebus,kafka,rabbitmq] [--messages N] [--write BENCHMARKS.md]
//! ```
//!
//! Each scenario runs in a child process of its own (this executable with `--scenario`),
//! so its peak RSS is its own; the child prints one JSON line with its results. The parent
//! creates entities and pre-fills backlogs before starting it, starts the Service Bus
//! emulator, prints a markdown table and, with `--write FILE`, puts it between
//! `<!-- bench:start -->` and `<!-- bench:end -->` in FILE.
//!
//! Needs LocalStack on 127.0.0.1:4566 for sqs and sns (`localstack/start`) and
//! `target/release/servicebus-emulator` for servicebus (built when missing), a Kafka
//! broker at `KAFKA_BROKERS` (default 127.0.0.1:9092) for kafka (`kafka/start`), and a
//! RabbitMQ node at `RABBITMQ_URL` for rabbitmq (`export "$(rabbitmq/start --print)"`).

mod aws;
mod cloud;
mod harness;
mod kafka;
mod memory;
mod plan;
mod rabbitmq;
mod report;
mod servicebus;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::process::Command;

use harness::Report;
use plan::{Job, Transport};
use report::Row;

const USAGE: &str = "\
usage: cloudbus-bench [--transports memory,sqs,sns,servicebus,kafka,rabbitmq] [--messages N]
                      [--write FILE] [--scenarios NAME,...] [--rounds R]

  --transports  transports to run, in order (default: all six)
  --messages    messages per scenario (default 20000; single-send cloud baselines use N/4,
                Kafka 10 N, RabbitMQ 2 N)
  --rounds      run each transport's scenarios this many times in turn (default 3)
  --write       put the results between <!-- bench:start --> and <!-- bench:end --> in FILE
  --scenarios   run only these scenarios (e.g. raw-batch,cloudbus-publish)";

/// What the command line asks for.
struct Args {
    transports: Vec<Transport>,
    messages: usize,
    write: Option<PathBuf>,
    only: Option<Vec<String>>,
    rounds: usize,
    /// Set in a child process: the one scenario to run.
    child: Option<Job>,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
        let mut parsed = Args {
            transports: Transport::ALL.to_vec(),
            messages: 20_000,
            write: None,
            only: None,
            rounds: 3,
            child: None,
        };
        let (mut scenario, mut transport, mut entity, mut queue) = (None, None, None, None);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
                None => (arg, None),
            };
            if flag == "--help" || flag == "-h" {
                bail!("{USAGE}");
            }
            let value = match inline.or_else(|| args.next()) {
                Some(value) => value,
                None => bail!("{flag} needs a value\n{USAGE}"),
            };
            let list = || value.split(',').map(str::trim).filter(|s| !s.is_empty());
            match flag.as_str() {
                "--transports" => {
                    parsed.transports = list().map(Transport::parse).collect::<Result<_>>()?
                }
                "--messages" => {
                    parsed.messages = value
                        .replace('_', "")
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            anyhow!("--messages {value}: expected a positive whole number")
                        })?;
                }
                "--write" => parsed.write = Some(PathBuf::from(value)),
                "--rounds" => {
                    parsed.rounds = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        anyhow!("--rounds {value}: expected a positive whole number")
                    })?;
                }
                "--scenarios" => parsed.only = Some(list().map(str::to_string).collect()),
                "--scenario" => scenario = Some(value),
                "--transport" => transport = Some(Transport::parse(&value)?),
                "--entity" => entity = Some(value),
                "--queue" => queue = Some(value),
                _ => bail!("unknown option {flag}\n{USAGE}"),
            }
        }
        if let Some(scenario) = scenario {
            let transport = transport.context("--scenario needs --transport")?;
            parsed.child = Some(Job {
                transport,
                scenario: transport.scenario(&scenario)?,
                messages: parsed.messages,
                entity: entity.context("--scenario needs --entity")?,
                queue,
            });
        }
        Ok(parsed)
    }
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    aws_defaults();
    match args.child {
        Some(job) => child(job),
        None => parent(args),
    }
}

/// LocalStack's credentials and region, unless the environment has some: the SDK chain
/// and cloudbus read them, here and in every child (which inherits them).
fn aws_defaults() {
    for (name, value) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", aws::REGION),
    ] {
        if std::env::var_os(name).is_none() {
            // SAFETY: called at the start of main, before any other thread exists.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

/// Runs one scenario and prints its report as one JSON line.
fn child(job: Job) -> ExitCode {
    // azservicebus (fe2o3-amqp 0.14) loses settlements on a multi-threaded runtime, so the
    // raw Service Bus scenarios (and the latency one, half of which is raw) run on a
    // current-thread one, azservicebus's best.
    let raw_amqp = job.transport == Transport::ServiceBus
        && (job.scenario.starts_with("raw-") || job.scenario == "latency");
    let runtime = if raw_amqp {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let result = runtime
        .context("starting the tokio runtime")
        .and_then(|runtime| runtime.block_on(run_scenario(&job)));
    let (report, code) = match result {
        Ok(report) => (
            Report {
                peak_rss_kib: harness::peak_rss_kib(),
                ..report
            },
            0,
        ),
        Err(e) => (
            Report {
                error: Some(format!("{e:#}")),
                ..Report::default()
            },
            1,
        ),
    };
    let line = serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    // Exit without waiting for the clients' background tasks to wind down.
    std::process::exit(code)
}

async fn run_scenario(job: &Job) -> Result<Report> {
    match (job.transport, job.scenario) {
        (_, scenario) if scenario.starts_with("cloudbus-") => cloud::run(job).await,
        (Transport::Memory, _) => memory::run(job).await,
        (Transport::Sqs | Transport::Sns, _) => aws::run(job).await,
        (Transport::ServiceBus, _) => servicebus::run(job).await,
        (Transport::Kafka, _) => kafka::run(job).await,
        (Transport::RabbitMq, _) => rabbitmq::run(job).await,
    }
}

fn parent(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_all(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every scenario, prints the table, writes the file; false if a scenario failed.
async fn run_all(args: Args) -> Result<bool> {
    let run_id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            % 0x1_0000_0000
    );
    let mut rows: Vec<Row> = Vec::new();
    for transport in &args.transports {
        // One set of jobs (with entities of their own) per round.
        let rounds = (0..args.rounds)
            .map(|round| {
                transport
                    .scenarios()
                    .iter()
                    .filter(|s| {
                        args.only
                            .as_ref()
                            .is_none_or(|only| only.iter().any(|o| o == *s))
                    })
                    .map(|s| Job::new(*transport, s, args.messages, &format!("{run_id}{round}")))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        if rounds.iter().all(Vec::is_empty) {
            continue;
        }
        let emulator = match transport {
            Transport::Memory => None,
            Transport::Sqs | Transport::Sns => {
                aws::check_localstack().await?;
                None
            }
            Transport::Kafka => {
                kafka::check_broker().await?;
                None
            }
            Transport::RabbitMq => {
                rabbitmq::check_broker().await?;
                None
            }
            Transport::ServiceBus => {
                // The latency scenario sends to a raw queue and a cloudbus queue of its own.
                let queues: Vec<String> = rounds
                    .iter()
                    .flatten()
                    .flat_map(|job| match job.scenario {
                        "latency" => {
                            vec![format!("{}-raw", job.entity), format!("{}-cb", job.entity)]
                        }
                        _ => vec![job.entity.clone()],
                    })
                    .collect();
                Some(servicebus::Emulator::start(&queues, &run_id).await?)
            }
        };
        let connection_string = emulator.as_ref().map(|e| e.connection_string.as_str());
        let first_row = rows.len();
        for (round, jobs) in rounds.into_iter().enumerate() {
            for (i, job) in jobs.into_iter().enumerate() {
                eprintln!(
                    "{} {} ({} messages, round {} of {})",
                    job.transport.name(),
                    job.scenario,
                    report::thousands(job.messages as f64),
                    round + 1,
                    args.rounds
                );
                let result = run_job(&job, connection_string)
                    .await
                    .map_err(|e| format!("{e:#}"));
                match &result {
                    Ok(report) => eprintln!(
                        "  {} msg/s, peak RSS {:.1} MiB",
                        report::thousands(report.rate()),
                        report.peak_rss_kib as f64 / 1024.0
                    ),
                    Err(e) => eprintln!("  failed: {e}"),
                }
                match rows.get_mut(first_row + i) {
                    Some(row) => row.rounds.push(result),
                    None => rows.push(Row {
                        job,
                        rounds: vec![result],
                    }),
                }
            }
        }
        if let Some(emulator) = emulator {
            emulator.stop().await;
        }
    }
    let table = report::table(&rows);
    println!("{table}");
    if let Some(path) = &args.write {
        let command = std::iter::once("cargo run --release -p cloudbus-bench --".to_string())
            .chain(std::env::args().skip(1).map(|arg| shell_quote(&arg)))
            .collect::<Vec<_>>()
            .join(" ");
        report::write(path, &report::section(&table, &command))?;
        eprintln!("wrote the results into {}", path.display());
    }
    Ok(rows.iter().all(|row| row.rounds.iter().all(Result::is_ok)))
}

/// Set-up in this process, then the scenario in a child; its report.
async fn run_job(job: &Job, connection_string: Option<&str>) -> Result<Report> {
    match (job.transport, connection_string) {
        (Transport::Sqs | Transport::Sns, _) => aws::prepare(job).await,
        (Transport::ServiceBus, Some(connection_string)) => {
            servicebus::prepare(job, connection_string).await
        }
        (Transport::Kafka, _) => kafka::prepare(job).await,
        (Transport::RabbitMq, _) => rabbitmq::prepare(job).await,
        _ => Ok(()),
    }
    .context("set-up")?;
    let mut command = Command::new(std::env::current_exe().context("locating this executable")?);
    command
        .args(job.child_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(connection_string) = connection_string {
        command.env(servicebus::CONNECTION_STRING_ENV, connection_string);
    }
    let child = command.spawn().context("starting the scenario's process")?;
    let limit = Duration::from_secs(1800);
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| {
            anyhow!(
                "the scenario's process ran longer than {} s",
                limit.as_secs()
            )
        })??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .ok_or_else(|| {
            anyhow!(
                "the scenario's process printed no report ({})",
                output.status
            )
        })?;
    let report: Report = serde_json::from_str(line).context("reading the scenario's report")?;
    match job.transport {
        Transport::Sqs | Transport::Sns => aws::clean_up(job).await.context("clean-up")?,
        Transport::Kafka => kafka::clean_up(job).await.context("clean-up")?,
        Transport::RabbitMq => rabbitmq::clean_up(job).await.context("clean-up")?,
        Transport::Memory | Transport::ServiceBus => {}
    }
    match report.error {
        Some(error) => Err(anyhow!(error)),
        None => Ok(report),
    }
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ",._-/=:".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}
