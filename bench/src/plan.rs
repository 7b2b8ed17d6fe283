//! What runs: transports, their scenarios, and the job one child process runs.

use anyhow::{Result, bail};

/// Calls per side in the latency scenario, after [`LATENCY_WARMUP`] each.
pub const LATENCY_CALLS: usize = 300;
pub const LATENCY_WARMUP: usize = 20;
/// Backlog of the drain scenario.
pub const DRAIN_MESSAGES: usize = 100_000;
/// Kafka scenarios run this many times `--messages`.
pub const KAFKA_SCALE: usize = 10;
/// RabbitMQ scenarios run this many times `--messages`.
pub const RABBITMQ_SCALE: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Memory,
    Sqs,
    Sns,
    ServiceBus,
    Kafka,
    RabbitMq,
}

impl Transport {
    pub const ALL: [Transport; 6] = [
        Transport::Memory,
        Transport::Sqs,
        Transport::Sns,
        Transport::ServiceBus,
        Transport::Kafka,
        Transport::RabbitMq,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Memory => "memory",
            Transport::Sqs => "sqs",
            Transport::Sns => "sns",
            Transport::ServiceBus => "servicebus",
            Transport::Kafka => "kafka",
            Transport::RabbitMq => "rabbitmq",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match Transport::ALL.into_iter().find(|t| t.name() == name) {
            Some(transport) => Ok(transport),
            None => bail!(
                "unknown transport `{name}`: use memory, sqs, sns, servicebus, kafka or rabbitmq"
            ),
        }
    }

    /// The scenarios of this transport, in the order they run.
    pub fn scenarios(self) -> &'static [&'static str] {
        match self {
            Transport::Sqs => &[
                "raw-single",
                "raw-batch",
                "raw-batch-envelope",
                "raw-batch-envelope-serial",
                "cloudbus-publish",
                "cloudbus-publish-batch",
                "omniqueue",
                "latency",
                "raw-consume",
                "cloudbus-consume",
                "omniqueue-consume",
                "cloudbus-drain-100k",
            ],
            Transport::Kafka | Transport::RabbitMq => &[
                "raw-single",
                "raw-batch",
                "cloudbus-publish",
                "cloudbus-publish-batch",
                "raw-consume",
                "cloudbus-receive",
                "raw-consume-tasks",
                "cloudbus-consume",
            ],
            Transport::ServiceBus => &[
                "raw-single",
                "raw-batch",
                "cloudbus-publish",
                "cloudbus-publish-batch",
                "cloudbus-publish-batch-16",
                "latency",
                "raw-consume",
                "cloudbus-consume",
            ],
            Transport::Memory | Transport::Sns => &[
                "raw-single",
                "raw-batch",
                "cloudbus-publish",
                "cloudbus-publish-batch",
                "raw-consume",
                "cloudbus-consume",
            ],
        }
    }

    /// The scenario of this transport named `name`.
    pub fn scenario(self, name: &str) -> Result<&'static str> {
        match self.scenarios().iter().find(|s| **s == name) {
            Some(scenario) => Ok(scenario),
            None => bail!(
                "{} has no scenario `{name}`; its scenarios: {}",
                self.name(),
                self.scenarios().join(", ")
            ),
        }
    }
}

/// True for scenarios timed on a pre-filled backlog.
pub fn is_consume(scenario: &str) -> bool {
    scenario.ends_with("consume")
        || matches!(
            scenario,
            "cloudbus-drain-100k" | "cloudbus-receive" | "raw-consume-tasks"
        )
}

/// One scenario on one transport, with its own entities.
#[derive(Debug, Clone)]
pub struct Job {
    pub transport: Transport,
    pub scenario: &'static str,
    pub messages: usize,
    /// Queue (SQS, Service Bus, memory) or topic (SNS).
    pub entity: String,
    /// SNS: the queue subscribed to the topic.
    pub queue: Option<String>,
}

impl Job {
    /// The job of `scenario` with `n` messages; `run_id` makes the entity names fresh.
    pub fn new(transport: Transport, scenario: &str, n: usize, run_id: &str) -> Result<Job> {
        let scenario = transport.scenario(scenario)?;
        let single_send = matches!(scenario, "raw-single" | "omniqueue");
        let messages = match scenario {
            "latency" => LATENCY_CALLS,
            "cloudbus-drain-100k" => DRAIN_MESSAGES,
            // One call per message against a remote broker is slow: a quarter keeps the run short.
            // Kafka moves N in a fraction of a second; ten times as many keep it measurable.
            _ if transport == Transport::Kafka => n * KAFKA_SCALE,
            // RabbitMQ confirms 6,000 single publishes (16 in flight) to 18,000 batched ones
            // a second here: twice N takes a few seconds, single sends included.
            _ if transport == Transport::RabbitMq => n * RABBITMQ_SCALE,
            _ if single_send && transport != Transport::Memory => (n / 4).max(1),
            _ => n,
        };
        let entity = format!("cbb-{run_id}-{}-{scenario}", transport.name());
        let queue = (transport == Transport::Sns).then(|| format!("{entity}-q"));
        Ok(Job {
            transport,
            scenario,
            messages,
            entity,
            queue,
        })
    }

    /// The queue a raw consumer reads: the subscribed queue for SNS, else the entity.
    pub fn receive_queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(&self.entity)
    }

    /// The arguments that make a child process run this job.
    pub fn child_args(&self) -> Vec<String> {
        let mut args = vec![
            "--scenario".into(),
            self.scenario.into(),
            "--transport".into(),
            self.transport.name().into(),
            "--messages".into(),
            self.messages.to_string(),
            "--entity".into(),
            self.entity.clone(),
        ];
        if let Some(queue) = &self.queue {
            args.extend(["--queue".into(), queue.clone()]);
        }
        args
    }
}
