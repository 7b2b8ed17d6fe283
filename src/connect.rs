//! From a URL or a [`Config`] to a `Box<dyn Publisher>` / `Box<dyn Subscriber>`.

use crate::config::IntoConfig;
use crate::{Inspector, Publisher, Result, Subscriber};

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

/// Opens an [`Inspector`] on the queue or subscription that `config` names: peek at its
/// messages and read its counts, consuming nothing.
///
/// ```
/// # async fn run() -> cloudbus::Result<()> {
/// let publisher = cloudbus::connect_publisher("memory://inspected").await?;
/// publisher.publish(cloudbus::Message::new("hello")).await?;
/// let inspector = cloudbus::connect_inspector("memory://inspected").await?;
/// assert_eq!(inspector.stats().await?.waiting, Some(1));
/// assert_eq!(inspector.peek(10).await?[0].message.text(), Some("hello"));
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
pub async fn connect_inspector(config: impl IntoConfig) -> Result<Box<dyn Inspector>> {
    config.into_config()?.connect_inspector().await
}
