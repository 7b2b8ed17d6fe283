//! Topology: the entities an emulator starts with, read from the official
//! emulator's `Config.json` (comments allowed) or built in code.

use std::time::Duration;

use serde::Deserialize;

/// Errors reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The JSON is invalid.
    #[error("invalid Config.json: {0}")]
    Json(String),
    /// A value is invalid.
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Properties shared by queues and subscriptions.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityProperties {
    /// How long a peek-lock lasts (LockDuration, default 1 minute).
    pub lock_duration: Duration,
    /// Deliveries before a message is dead-lettered (MaxDeliveryCount, default 3 as in the official emulator).
    pub max_delivery_count: u32,
    /// Default time to live (DefaultMessageTimeToLive, default 1 hour).
    pub default_message_ttl: Duration,
    /// Dead-letter expired messages (DeadLetteringOnMessageExpiration).
    pub dead_lettering_on_message_expiration: bool,
    /// Sessions required (RequiresSession).
    pub requires_session: bool,
    /// Duplicate detection (RequiresDuplicateDetection; queues and topics).
    pub requires_duplicate_detection: bool,
    /// Duplicate detection window (DuplicateDetectionHistoryTimeWindow, default 20 s).
    pub duplicate_detection_window: Duration,
    /// Largest accepted message in bytes (default 256 KiB).
    pub max_message_size: u64,
    /// Forward every message to this entity (ForwardTo).
    pub forward_to: Option<String>,
    /// Forward dead-lettered messages to this entity (ForwardDeadLetteredMessagesTo).
    pub forward_dead_lettered_messages_to: Option<String>,
}

impl Default for EntityProperties {
    fn default() -> Self {
        EntityProperties {
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 3,
            default_message_ttl: Duration::from_secs(3600),
            dead_lettering_on_message_expiration: false,
            requires_session: false,
            requires_duplicate_detection: false,
            duplicate_detection_window: Duration::from_secs(20),
            max_message_size: 256 * 1024,
            forward_to: None,
            forward_dead_lettered_messages_to: None,
        }
    }
}

/// A subscription filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Matches everything.
    True,
    /// Matches nothing.
    False,
    /// Correlation filter: all given fields must be equal.
    Correlation(CorrelationFilter),
    /// A SQL filter expression (the supported subset is documented in `filters`).
    Sql(String),
}

/// Fields of a correlation filter; `None` fields are not compared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CorrelationFilter {
    /// properties.content-type
    pub content_type: Option<String>,
    /// properties.correlation-id
    pub correlation_id: Option<String>,
    /// properties.subject (Label)
    pub label: Option<String>,
    /// properties.message-id
    pub message_id: Option<String>,
    /// properties.reply-to
    pub reply_to: Option<String>,
    /// properties.reply-to-group-id
    pub reply_to_session_id: Option<String>,
    /// properties.group-id
    pub session_id: Option<String>,
    /// properties.to
    pub to: Option<String>,
    /// Application properties that must be equal (compared as strings or numbers).
    pub properties: Vec<(String, serde_json::Value)>,
}

/// A named subscription rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Rule name.
    pub name: String,
    /// Its filter.
    pub filter: Filter,
}

/// A queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// Name.
    pub name: String,
    /// Properties.
    pub properties: EntityProperties,
}

/// A subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionConfig {
    /// Name.
    pub name: String,
    /// Properties.
    pub properties: EntityProperties,
    /// Rules; empty means the `$Default` rule matching everything.
    pub rules: Vec<Rule>,
}

/// A topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicConfig {
    /// Name.
    pub name: String,
    /// Properties (duplicate detection, TTL, message size apply to topics).
    pub properties: EntityProperties,
    /// Subscriptions.
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// The entities of one namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Queues.
    pub queues: Vec<QueueConfig>,
    /// Topics with subscriptions.
    pub topics: Vec<TopicConfig>,
}

impl QueueConfig {
    /// A queue with default properties.
    pub fn new(name: impl Into<String>) -> Self {
        QueueConfig {
            name: name.into(),
            properties: EntityProperties::default(),
        }
    }
}

impl SubscriptionConfig {
    /// A subscription with default properties and the `$Default` rule.
    pub fn new(name: impl Into<String>) -> Self {
        SubscriptionConfig {
            name: name.into(),
            properties: EntityProperties::default(),
            rules: Vec::new(),
        }
    }
}

impl TopicConfig {
    /// A topic with the given subscriptions.
    pub fn new(name: impl Into<String>, subscriptions: Vec<SubscriptionConfig>) -> Self {
        TopicConfig {
            name: name.into(),
            properties: EntityProperties::default(),
            subscriptions,
        }
    }
}

impl Topology {
    /// The built-in default: the queues and topic of the official emulator's sample Config.json.
    pub fn default_sample() -> Self {
        Topology {
            queues: vec![QueueConfig::new("queue.1")],
            topics: vec![TopicConfig::new(
                "topic.1",
                vec![
                    SubscriptionConfig::new("subscription.1"),
                    SubscriptionConfig::new("subscription.2"),
                ],
            )],
        }
    }

    /// Parse the official emulator's Config.json (with `//` and `/* */` comments).
    pub fn from_config_json(text: &str) -> Result<Self, ConfigError> {
        let clean = strip_json_comments(text);
        let root: RawRoot =
            serde_json::from_str(&clean).map_err(|e| ConfigError::Json(e.to_string()))?;
        let mut topology = Topology::default();
        for ns in root.user_config.namespaces {
            for q in ns.queues {
                topology.queues.push(QueueConfig {
                    name: q.name,
                    properties: q.properties.into_props()?,
                });
            }
            for t in ns.topics {
                let mut subs = Vec::new();
                for s in t.subscriptions {
                    let mut rules = Vec::new();
                    for r in s.rules {
                        rules.push(r.into_rule()?);
                    }
                    subs.push(SubscriptionConfig {
                        name: s.name,
                        properties: s.properties.into_props()?,
                        rules,
                    });
                }
                topology.topics.push(TopicConfig {
                    name: t.name,
                    properties: t.properties.into_props()?,
                    subscriptions: subs,
                });
            }
        }
        Ok(topology)
    }

    /// Read a Config.json file.
    pub fn from_config_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_config_json(&text)
    }
}

/// Remove `//` and `/* */` comments outside strings (and trailing commas before `]` or `}`).
pub fn strip_json_comments(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut in_string = false;
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            out.push(c);
            if c == '\\' && i + 1 < chars.len() {
                out.push(chars[i + 1]);
                i += 2;
                continue;
            }
            if c == '"' {
                in_string = false;
            }
            i += 1;
        } else if c == '"' {
            in_string = true;
            out.push(c);
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == ',' {
            let mut j = i + 1;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if !matches!(chars.get(j), Some(']') | Some('}')) {
                out.push(c);
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Parse an ISO 8601 duration such as `PT1M`, `P1DT2H`, `PT0.5S` (TimeSpan.MaxValue saturates).
pub fn parse_iso8601_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Invalid(format!("`{s}` is not an ISO 8601 duration such as PT1M"));
    let rest = s.trim().strip_prefix('P').ok_or_else(bad)?;
    let mut secs = 0f64;
    let mut in_time = false;
    let mut num = String::new();
    for c in rest.chars() {
        match c {
            'T' => in_time = true,
            '0'..='9' | '.' | ',' => num.push(if c == ',' { '.' } else { c }),
            unit => {
                let n: f64 = num.parse().map_err(|_| bad())?;
                num.clear();
                secs += n * match (unit, in_time) {
                    ('Y', false) => 365.0 * 86400.0,
                    ('M', false) => 30.0 * 86400.0,
                    ('W', false) => 7.0 * 86400.0,
                    ('D', false) => 86400.0,
                    ('H', true) => 3600.0,
                    ('M', true) => 60.0,
                    ('S', true) => 1.0,
                    _ => return Err(bad()),
                };
            }
        }
    }
    if !num.is_empty() {
        return Err(bad());
    }
    // Cap at ~100 years: "forever" in Service Bus terms.
    Ok(Duration::from_secs_f64(secs.min(3.15e9)))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRoot {
    user_config: RawUserConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawUserConfig {
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNamespace {
    #[serde(default)]
    queues: Vec<RawEntity>,
    #[serde(default)]
    topics: Vec<RawTopic>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawEntity {
    name: String,
    #[serde(default)]
    properties: RawProps,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTopic {
    name: String,
    #[serde(default)]
    properties: RawProps,
    #[serde(default)]
    subscriptions: Vec<RawSubscription>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawSubscription {
    name: String,
    #[serde(default)]
    properties: RawProps,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawProps {
    lock_duration: Option<String>,
    max_delivery_count: Option<u32>,
    default_message_time_to_live: Option<String>,
    dead_lettering_on_message_expiration: Option<bool>,
    requires_session: Option<bool>,
    requires_duplicate_detection: Option<bool>,
    duplicate_detection_history_time_window: Option<String>,
    forward_to: Option<String>,
    forward_dead_lettered_messages_to: Option<String>,
    max_message_size_in_kilobytes: Option<u64>,
}

impl RawProps {
    fn into_props(self) -> Result<EntityProperties, ConfigError> {
        let mut p = EntityProperties::default();
        if let Some(v) = self.lock_duration {
            p.lock_duration = parse_iso8601_duration(&v)?;
        }
        if let Some(v) = self.max_delivery_count {
            p.max_delivery_count = v.max(1);
        }
        if let Some(v) = self.default_message_time_to_live {
            p.default_message_ttl = parse_iso8601_duration(&v)?;
        }
        if let Some(v) = self.duplicate_detection_history_time_window {
            p.duplicate_detection_window = parse_iso8601_duration(&v)?;
        }
        p.dead_lettering_on_message_expiration =
            self.dead_lettering_on_message_expiration.unwrap_or(false);
        p.requires_session = self.requires_session.unwrap_or(false);
        p.requires_duplicate_detection = self.requires_duplicate_detection.unwrap_or(false);
        p.forward_to = self.forward_to.filter(|s| !s.is_empty());
        p.forward_dead_lettered_messages_to = self
            .forward_dead_lettered_messages_to
            .filter(|s| !s.is_empty());
        if let Some(kb) = self.max_message_size_in_kilobytes {
            p.max_message_size = kb * 1024;
        }
        Ok(p)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRule {
    name: String,
    properties: RawRuleProps,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRuleProps {
    filter_type: String,
    correlation_filter: Option<RawCorrelation>,
    sql_filter: Option<RawSql>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawSql {
    sql_expression: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawCorrelation {
    content_type: Option<String>,
    correlation_id: Option<String>,
    label: Option<String>,
    message_id: Option<String>,
    reply_to: Option<String>,
    reply_to_session_id: Option<String>,
    session_id: Option<String>,
    to: Option<String>,
    #[serde(default)]
    properties: serde_json::Map<String, serde_json::Value>,
}

impl RawRule {
    fn into_rule(self) -> Result<Rule, ConfigError> {
        let filter = match self.properties.filter_type.to_ascii_lowercase().as_str() {
            "correlation" => {
                let c = self.properties.correlation_filter.unwrap_or_default();
                Filter::Correlation(CorrelationFilter {
                    content_type: c.content_type,
                    correlation_id: c.correlation_id,
                    label: c.label,
                    message_id: c.message_id,
                    reply_to: c.reply_to,
                    reply_to_session_id: c.reply_to_session_id,
                    session_id: c.session_id,
                    to: c.to,
                    properties: c.properties.into_iter().collect(),
                })
            }
            "sql" => {
                let sql = self.properties.sql_filter.ok_or_else(|| {
                    ConfigError::Invalid(format!("rule {} has no SqlFilter", self.name))
                })?;
                crate::filters::SqlExpr::parse(&sql.sql_expression)
                    .map_err(|e| ConfigError::Invalid(format!("rule {}: {e}", self.name)))?;
                Filter::Sql(sql.sql_expression)
            }
            other => {
                return Err(ConfigError::Invalid(format!(
                    "rule {}: unknown FilterType {other}",
                    self.name
                )));
            }
        };
        Ok(Rule {
            name: self.name,
            filter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_iso8601_duration("PT1M").ok(),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_iso8601_duration("PT1H").ok(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_iso8601_duration("P1DT1S").ok(),
            Some(Duration::from_secs(86401))
        );
        assert_eq!(
            parse_iso8601_duration("PT0.5S").ok(),
            Some(Duration::from_millis(500))
        );
        assert!(parse_iso8601_duration("1M").is_err());
    }

    #[test]
    fn official_sample_config_parses() {
        let text = include_str!("../tests/Config.json");
        let t = Topology::from_config_json(text).expect("parses");
        assert_eq!(t.queues[0].name, "queue.1");
        assert_eq!(
            t.queues[0].properties.lock_duration,
            Duration::from_secs(60)
        );
        assert_eq!(t.topics[0].subscriptions.len(), 3);
        assert!(matches!(
            t.topics[0].subscriptions[0].rules[0].filter,
            Filter::Correlation(_)
        ));
        assert!(matches!(
            t.topics[0].subscriptions[2].rules[0].filter,
            Filter::Sql(_)
        ));
    }
}
