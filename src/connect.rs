//! From a URL or a [`Config`] to a `Box<dyn Publisher>` / `Box<dyn Subscriber>`.

use crate::config::IntoConfig;
use crate::{Publisher, Result, Subscriber};

/// Connects a publisher to the queue or topic that `config` (a URL, a [`Config`](crate::Config)
/// or a transport's config struct) names.
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
    config.into_config()?.connect_publisher().await
}

/// Connects a subscriber to the queue or subscription that `config` (a URL, a
/// [`Config`](crate::Config) or a transport's config struct) names.
pub async fn connect_subscriber(config: impl IntoConfig) -> Result<Box<dyn Subscriber>> {
    config.into_config()?.connect_subscriber().await
}
