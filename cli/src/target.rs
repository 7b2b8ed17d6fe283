//! Which queue, topic or subscription a command works on: the positional URL, `--url` or
//! `CLOUDBUS_URL`, or `--config FILE` (the library's serde config in TOML).

use std::path::Path;

use cloudbus::Config;
use cloudbus::config::ConfigUrl;

use crate::TargetArgs;
use crate::exit::Failure;

/// A resolved target: the config, and how to name it in messages (never with a secret).
pub struct Target {
    pub config: Config,
    pub shown: String,
}

impl Target {
    /// A target from a URL.
    pub fn from_url(url: &str) -> Result<Target, Failure> {
        let shown = ConfigUrl::parse(url)
            .map(|u| u.redacted().to_string())
            .unwrap_or_else(|_| "the URL".into());
        let config = Config::from_url(url).map_err(|e| Failure::of("reading", &shown, e))?;
        Ok(Target { config, shown })
    }

    /// The same target with another config (its dead-letter queue, its redrive target).
    pub fn derived(&self, config: Config, what: &str) -> Target {
        Target {
            config,
            shown: format!("{what} of {}", self.shown),
        }
    }
}

/// The target of a command: the positional URL wins, then `--url` / `CLOUDBUS_URL`, then
/// `--config`.
pub fn resolve(positional: Option<&str>, args: &TargetArgs) -> Result<Target, Failure> {
    if let Some(url) = positional.or(args.url.as_deref()) {
        return Target::from_url(url);
    }
    match &args.config {
        Some(path) => from_file(path),
        None => Err(Failure::usage(
            "no queue, topic or subscription given: pass a URL (`cloudbus receive \
             sqs://orders`), --url, CLOUDBUS_URL, or --config FILE",
        )),
    }
}

/// The serde config in a TOML file: a `transport` key at the top, or in exactly one table
/// (as a service's own config file holds it, say under `[bus]`).
fn from_file(path: &Path) -> Result<Target, Failure> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read the config file {shown}: {e}")))?;
    let value: toml::Table =
        toml::from_str(&text).map_err(|e| Failure::usage(format!("{shown} is not TOML: {e}")))?;
    let table = if value.contains_key("transport") {
        value
    } else {
        let mut tables = value.into_iter().filter_map(|(name, v)| match v {
            toml::Value::Table(t) if t.contains_key("transport") => Some((name, t)),
            _ => None,
        });
        match (tables.next(), tables.next()) {
            (Some((_, table)), None) => table,
            (None, _) => {
                return Err(Failure::usage(format!(
                    "{shown} has no `transport` key, at the top or in a table"
                )));
            }
            (Some((first, _)), Some((second, _))) => {
                return Err(Failure::usage(format!(
                    "{shown} has several transport configs ([{first}], [{second}], ...): keep \
                     one in the file you pass"
                )));
            }
        }
    };
    let json = serde_json::to_value(&table).map_err(|e| Failure::usage(format!("{shown}: {e}")))?;
    let config: Config =
        serde_json::from_value(json).map_err(|e| Failure::usage(format!("{shown}: {e}")))?;
    Ok(Target {
        shown: format!("{}:// from {shown}", config.transport()),
        config,
    })
}
