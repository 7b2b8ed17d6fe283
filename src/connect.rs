//! From a [`Config`] (or URL) to a `Box<dyn Publisher>` / `Box<dyn Subscriber>`.

#[cfg(feature = "aws")]
use crate::adapters::aws;
#[cfg(feature = "azure")]
use crate::adapters::azure;
use crate::adapters::memory;
use crate::config::{Config, IntoConfig};
use crate::{Error, Publisher, Result, Subscriber};

/// Connects a publisher to the queue or topic that `config` (a URL or a [`Config`]) names.
///
/// ```
/// # async fn run() -> cloudbus::Result<()> {
/// let publisher = cloudbus::connect_publisher("memory://orders").await?;
/// let id = publisher.publish(cloudbus::Message::new("hello")).await?;
/// # let _ = id; Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
pub async fn connect_publisher(config: impl IntoConfig) -> Result<Box<dyn Publisher>> {
    match config.into_config()? {
        Config::Memory(c) => Ok(Box::new(memory::publisher(&c)?)),
        #[cfg(feature = "aws")]
        Config::Sqs(c) => Ok(Box::new(aws::sqs::SqsPublisher::connect(&c).await?)),
        #[cfg(feature = "aws")]
        Config::Sns(c) => Ok(Box::new(aws::sns::SnsPublisher::connect(&c).await?)),
        #[cfg(feature = "azure")]
        Config::ServiceBus(c) => Ok(Box::new(
            azure::servicebus::ServiceBusPublisher::connect(&c).await?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(missing_feature(&other)),
    }
}

/// Connects a subscriber to the queue or subscription that `config` (a URL or a
/// [`Config`]) names.
pub async fn connect_subscriber(config: impl IntoConfig) -> Result<Box<dyn Subscriber>> {
    match config.into_config()? {
        Config::Memory(c) => Ok(Box::new(memory::subscriber(&c)?)),
        #[cfg(feature = "aws")]
        Config::Sqs(c) => Ok(Box::new(aws::sqs::SqsSubscriber::connect(&c).await?)),
        #[cfg(feature = "aws")]
        Config::Sns(c) => Ok(Box::new(aws::sns::connect_subscriber(&c).await?)),
        #[cfg(feature = "azure")]
        Config::ServiceBus(c) => Ok(Box::new(
            azure::servicebus::ServiceBusSubscriber::connect(&c).await?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(missing_feature(&other)),
    }
}

/// The error for a transport whose cargo feature this build lacks.
fn missing_feature(config: &Config) -> Error {
    let (scheme, feature, enabled) = match config.transport() {
        "servicebus" => ("servicebus", "azure", cfg!(feature = "azure")),
        other => (other, "aws", cfg!(feature = "aws")),
    };
    if enabled {
        return Error::Unsupported {
            transport: config.transport(),
            feature: format!("{scheme}:// in this version of cloudbus (not implemented yet)"),
        };
    }
    Error::config(format!(
        "{scheme}:// needs the cargo feature `{feature}`, which this build lacks: \
         add `features = [\"{feature}\"]` to the cloudbus dependency in Cargo.toml"
    ))
}
