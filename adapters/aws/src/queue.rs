//! An SQS queue as cloudbus uses it: resolving (or creating) it and its dead-letter queue,
//! and the calls made on one queue.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use cloudbus_core::{Error, Result};

use crate::client::sdk_config;
use crate::codec::{Encoded, Target};
use crate::config::{SqsConfig, sqs_dead_letter_name};
use crate::error::{Subject, map_error};

const TRANSPORT: &str = "sqs";
/// The longest visibility timeout SQS allows (12 hours).
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

/// A resolved queue: the client, its URL and what cloudbus needs to know about it.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) client: Client,
    pub(crate) url: String,
    pub(crate) name: String,
    pub(crate) fifo: bool,
}

impl Queue {
    pub(crate) fn subject(&self) -> Subject<'_> {
        Subject {
            transport: TRANSPORT,
            entity: "queue",
            name: &self.name,
        }
    }

    pub(crate) fn target(&self, max_size: usize) -> Target {
        Target {
            transport: TRANSPORT,
            fifo: self.fifo,
            delay: !self.fifo,
            max_size,
        }
    }

    pub(crate) async fn attributes(
        &self,
        names: &[QueueAttributeName],
    ) -> Result<HashMap<String, String>> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| map_error(self.subject(), "GetQueueAttributes", e))?;
        Ok(output
            .attributes()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The queue's ARN.
    pub(crate) async fn arn(&self) -> Result<String> {
        self.attributes(&[QueueAttributeName::QueueArn])
            .await?
            .remove("QueueArn")
            .ok_or_else(|| {
                Error::transport(
                    TRANSPORT,
                    "GetQueueAttributes returned no QueueArn",
                    true,
                    None,
                )
            })
    }

    /// Adds to the queue's access policy a statement that lets the SNS topic `topic_arn`
    /// send to it, keeping the statements already there.
    pub(crate) async fn allow_topic(&self, queue_arn: &str, topic_arn: &str) -> Result<()> {
        let existing = self
            .attributes(&[QueueAttributeName::Policy])
            .await?
            .remove("Policy");
        let mut policy = existing
            .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
            .filter(|p| p["Statement"].is_array())
            .unwrap_or_else(|| serde_json::json!({ "Version": "2012-10-17", "Statement": [] }));
        let sid = format!("cloudbus-{}", name_of(topic_arn));
        let statements = policy["Statement"].as_array_mut();
        let Some(statements) = statements else {
            return Ok(());
        };
        if statements.iter().any(|s| s["Sid"] == sid.as_str()) {
            return Ok(());
        }
        statements.push(serde_json::json!({
            "Sid": sid,
            "Effect": "Allow",
            "Principal": { "Service": "sns.amazonaws.com" },
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } },
        }));
        self.client
            .set_queue_attributes()
            .queue_url(&self.url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| map_error(self.subject(), "SetQueueAttributes (Policy)", e))?;
        Ok(())
    }

    pub(crate) async fn send(&self, encoded: Encoded) -> Result<()> {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(encoded.body)
            .set_message_attributes(Some(attribute_map(encoded.attributes)?))
            .set_message_group_id(encoded.group_id)
            .set_message_deduplication_id(encoded.deduplication_id)
            .set_delay_seconds(encoded.delay_seconds)
            .send()
            .await
            .map_err(|e| map_error(self.subject(), "SendMessage", e))?;
        Ok(())
    }

    pub(crate) async fn change_visibility(
        &self,
        receipt: &str,
        by: Duration,
        message_id: &str,
    ) -> Result<()> {
        if by > MAX_VISIBILITY {
            return Err(Error::InvalidInput {
                transport: TRANSPORT,
                field: "delay",
                rule: format!(
                    "SQS keeps a message invisible for at most {} s (12 hours)",
                    MAX_VISIBILITY.as_secs()
                ),
            });
        }
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(ceil_secs(by))
            .send()
            .await
            .map_err(|e| receipt_error(self.subject(), "ChangeMessageVisibility", e, message_id))?;
        Ok(())
    }
}

/// Whole seconds, rounded up (SQS timers have a one-second granularity; rounding down
/// would redeliver early).
pub(crate) fn ceil_secs(d: Duration) -> i32 {
    d.as_secs_f64().ceil().min(i32::MAX as f64) as i32
}

pub(crate) fn attribute_map(
    attributes: Vec<(String, String)>,
) -> Result<HashMap<String, MessageAttributeValue>> {
    attributes
        .into_iter()
        .map(|(key, value)| {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(|e| {
                    Error::transport(TRANSPORT, format!("attribute `{key}`: {e}"), false, None)
                })?;
            Ok((key, value))
        })
        .collect()
}

/// Maps an error of a call made with a receipt handle: an invalid or expired receipt
/// means the lock was lost.
fn receipt_error<E>(
    subject: Subject<'_>,
    action: &str,
    error: aws_sdk_sqs::error::SdkError<E, aws_sdk_sqs::config::http::HttpResponse>,
    message_id: &str,
) -> Error
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = error.code().unwrap_or_default();
    let message = error.message().unwrap_or_default().to_ascii_lowercase();
    if code.contains("ReceiptHandleIsInvalid")
        || code.contains("MessageNotInflight")
        || message.contains("receipt handle")
        || message.contains("not in flight")
    {
        return Error::LockLost {
            transport: TRANSPORT,
            message_id: message_id.to_string(),
        };
    }
    map_error(subject, action, error)
}

/// The queue name in a queue URL or ARN (its last segment).
pub(crate) fn name_of(queue: &str) -> &str {
    queue
        .rsplit(['/', ':'])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(queue)
}

/// Connects a client and resolves (or, with `create`, creates) the queue.
pub(crate) async fn open(config: &SqsConfig) -> Result<Queue> {
    let sdk = sdk_config(config.region.as_deref(), config.endpoint.as_deref()).await;
    let client = Client::new(&sdk);
    let name = name_of(&config.queue).to_string();
    let fifo = name.ends_with(".fifo");
    let subject = Subject {
        transport: TRANSPORT,
        entity: "queue",
        name: &name,
    };
    let url = if config.queue.starts_with("https://") || config.queue.starts_with("http://") {
        config.queue.clone()
    } else if config.create {
        create(&client, &name, config).await?
    } else {
        client
            .get_queue_url()
            .queue_name(&name)
            .send()
            .await
            .map_err(|e| map_error(subject, "GetQueueUrl", e))?
            .queue_url()
            .unwrap_or_default()
            .to_string()
    };
    Ok(Queue {
        client,
        url,
        name,
        fifo,
    })
}

/// Creates the queue `name` with a dead-letter queue (`<name>-dlq`, or `<base>-dlq.fifo`)
/// and a redrive policy; returns the queue URL. Existing queues are used as they are.
async fn create(client: &Client, name: &str, config: &SqsConfig) -> Result<String> {
    let fifo = name.ends_with(".fifo");
    let dlq_name = sqs_dead_letter_name(name);
    if dlq_name.len() > 80 {
        return Err(Error::config(format!(
            "queue name `{name}` is too long for create=true: SQS names are at most 80 \
             characters and the dead-letter queue adds `-dlq`, so use at most 76"
        )));
    }
    let mut dlq_attributes = HashMap::from([(
        QueueAttributeName::MessageRetentionPeriod,
        (14 * 24 * 3600).to_string(),
    )]);
    if fifo {
        dlq_attributes.insert(QueueAttributeName::FifoQueue, "true".into());
    }
    let dlq_url = create_queue(client, &dlq_name, dlq_attributes).await?;
    let dlq = Queue {
        client: client.clone(),
        url: dlq_url,
        name: dlq_name,
        fifo,
    };
    let dlq_arn = dlq.arn().await?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": config.max_receive_count.max(1),
    });
    let mut attributes = HashMap::from([(QueueAttributeName::RedrivePolicy, redrive.to_string())]);
    if fifo {
        attributes.insert(QueueAttributeName::FifoQueue, "true".into());
    }
    if let Some(visibility) = config.visibility {
        attributes.insert(
            QueueAttributeName::VisibilityTimeout,
            ceil_secs(visibility).to_string(),
        );
    }
    create_queue(client, name, attributes).await
}

async fn create_queue(
    client: &Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<String> {
    let subject = Subject {
        transport: TRANSPORT,
        entity: "queue",
        name,
    };
    match client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes))
        .send()
        .await
    {
        Ok(output) => Ok(output.queue_url().unwrap_or_default().to_string()),
        Err(error)
            if error.code() == Some("QueueAlreadyExists")
                || error.code() == Some("QueueNameExists") =>
        {
            tracing::info!(
                messaging.system = crate::sqs::SYSTEM,
                messaging.destination.name = name,
                "queue exists with other attributes; using it as it is"
            );
            Ok(client
                .get_queue_url()
                .queue_name(name)
                .send()
                .await
                .map_err(|e| map_error(subject, "GetQueueUrl", e))?
                .queue_url()
                .unwrap_or_default()
                .to_string())
        }
        Err(error) => Err(map_error(subject, "CreateQueue", error)),
    }
}

/// Resolves the dead-letter queue named by a redrive policy.
pub(crate) async fn dead_letter_queue(queue: &Queue, policy: &str) -> Result<Option<Queue>> {
    let Some(arn) = serde_json::from_str::<serde_json::Value>(policy)
        .ok()
        .and_then(|p| p["deadLetterTargetArn"].as_str().map(str::to_string))
    else {
        return Ok(None);
    };
    // arn:aws:sqs:<region>:<account>:<name>
    let parts: Vec<&str> = arn.split(':').collect();
    let (Some(account), Some(name)) = (parts.get(4), parts.get(5)) else {
        return Ok(None);
    };
    let subject = Subject {
        transport: TRANSPORT,
        entity: "queue",
        name,
    };
    let url = queue
        .client
        .get_queue_url()
        .queue_name(*name)
        .queue_owner_aws_account_id(*account)
        .send()
        .await
        .map_err(|e| map_error(subject, "GetQueueUrl (dead-letter queue)", e))?
        .queue_url()
        .unwrap_or_default()
        .to_string();
    Ok(Some(Queue {
        client: queue.client.clone(),
        url,
        name: name.to_string(),
        fifo: name.ends_with(".fifo"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_from_urls_and_arns() {
        assert_eq!(name_of("orders"), "orders");
        assert_eq!(
            name_of("https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo"),
            "orders.fifo"
        );
        assert_eq!(
            name_of("arn:aws:sqs:us-east-1:123456789012:orders-dlq"),
            "orders-dlq"
        );
    }

    #[test]
    fn visibility_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }
}
