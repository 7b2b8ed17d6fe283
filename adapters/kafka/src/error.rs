//! librdkafka errors to cloudbus errors.

use std::sync::Arc;

use cloudbus_core::Error;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::TRANSPORT;

/// Maps a client error: authentication and authorization to `Unauthorized`, a missing
/// topic to `NotFound`, the rest to `Transport` (transient unless retrying cannot help).
pub(crate) fn map_error(action: &str, topic: &str, error: KafkaError) -> Error {
    let code = error.rdkafka_error_code();
    let text = format!("{action}: {error}");
    match code {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            Error::NotFound {
                transport: TRANSPORT,
                entity: "topic",
                name: topic.to_string(),
            }
        }
        Some(
            RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => Error::Unauthorized {
            transport: TRANSPORT,
            message: text,
            source: Some(Arc::new(error)),
        },
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::InvalidArgument
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::UnsupportedVersion
            | RDKafkaErrorCode::PolicyViolation,
        ) => Error::Transport {
            transport: TRANSPORT,
            message: text,
            transient: false,
            source: Some(Arc::new(error)),
        },
        _ => Error::Transport {
            transport: TRANSPORT,
            message: text,
            transient: !matches!(
                error,
                KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_)
            ),
            source: Some(Arc::new(error)),
        },
    }
}
