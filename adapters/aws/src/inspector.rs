//! Looking into an SQS queue (and the queue of an SNS subscription): the counts SQS
//! reports. SQS cannot show a message without receiving it, so `peek` is `Unsupported`.

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use cloudbus_core::inspector::{Inspector, Peeked, Stats};
use cloudbus_core::{Destination, Error, Result};

use crate::config::SqsConfig;
use crate::queue::{Queue, dead_letter_queue, open};

const TRANSPORT: &str = "sqs";

/// Looks into an SQS queue: messages waiting, in flight (received, not deleted, still
/// invisible) and in its dead-letter queue (the redrive policy's target).
pub struct SqsInspector {
    queue: Queue,
    destination: Destination,
}

impl SqsInspector {
    /// Opens an inspector on the queue `config` names; it never creates one.
    pub async fn connect(config: &SqsConfig) -> Result<Self> {
        let existing = SqsConfig {
            create: false,
            ..config.clone()
        };
        let queue = open(&existing).await?;
        let destination = Destination::new(TRANSPORT, queue.name.clone());
        Ok(SqsInspector { queue, destination })
    }

    /// An inspector whose destination says which SNS topic the queue is subscribed to.
    pub(crate) fn with_destination(mut self, destination: Destination) -> Self {
        self.destination = destination;
        self
    }
}

/// A count attribute of GetQueueAttributes.
fn count(attributes: &std::collections::HashMap<String, String>, name: &str) -> Option<u64> {
    attributes.get(name).and_then(|v| v.parse().ok())
}

#[async_trait]
impl Inspector for SqsInspector {
    async fn peek(&self, _max: usize) -> Result<Vec<Peeked>> {
        Err(Error::Unsupported {
            transport: TRANSPORT,
            feature: format!(
                "peek on `{}`: SQS shows a message only by receiving it, which hides it for \
                 the visibility timeout and counts a receive towards the redrive policy; \
                 receive it and release it instead",
                self.queue.name
            ),
        })
    }

    async fn stats(&self) -> Result<Stats> {
        let attributes = self
            .queue
            .attributes(&[
                QueueAttributeName::ApproximateNumberOfMessages,
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                QueueAttributeName::ApproximateNumberOfMessagesDelayed,
                QueueAttributeName::RedrivePolicy,
            ])
            .await?;
        let waiting = count(&attributes, "ApproximateNumberOfMessages").map(|visible| {
            visible + count(&attributes, "ApproximateNumberOfMessagesDelayed").unwrap_or(0)
        });
        let mut stats = Stats::default()
            .with_waiting(waiting)
            .with_in_flight(count(&attributes, "ApproximateNumberOfMessagesNotVisible"));
        let dead_letter = match attributes.get("RedrivePolicy") {
            Some(policy) => dead_letter_queue(&self.queue, policy).await?,
            None => None,
        };
        match dead_letter {
            Some(dead_letter) => {
                stats.dead_lettered = count(
                    &dead_letter
                        .attributes(&[QueueAttributeName::ApproximateNumberOfMessages])
                        .await?,
                    "ApproximateNumberOfMessages",
                )
            }
            None => {
                stats = stats.not_reported(
                    "dead_lettered",
                    "the queue has no redrive policy, so no dead-letter queue",
                )
            }
        }
        Ok(stats.not_reported(
            "oldest_age",
            "SQS reports it only as the CloudWatch metric ApproximateAgeOfOldestMessage",
        ))
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    fn destination(&self) -> Destination {
        self.destination.clone()
    }
}
