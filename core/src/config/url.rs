//! The URL form of a configuration: `<scheme>://<path>?<option>=<value>&...`, parsed into
//! the transport's serde struct by the same `Deserialize` that reads TOML or JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

use super::{DEAD_LETTER_SUFFIX, SECRET_NAME, redact_url};
use crate::{Error, Result};

/// A cloudbus URL split into scheme, path (percent-decoded) and query options.
///
/// ```
/// use cloudbus_core::config::ConfigUrl;
///
/// #[derive(serde::Deserialize, Debug, PartialEq, Default)]
/// #[serde(default, deny_unknown_fields)]
/// struct Options { queue: String, create: bool, batch_size: usize }
///
/// let url = ConfigUrl::parse("demo://orders?create&batch_size=5")?;
/// let options: Options = url.deserialize(&[("queue", url.entity("queue")?)])?;
/// assert_eq!(options, Options { queue: "orders".into(), create: true, batch_size: 5 });
///
/// let typo = ConfigUrl::parse("demo://orders?creat=true")?;
/// let error = typo.deserialize::<Options>(&[("queue", "orders")]).unwrap_err();
/// assert!(error.to_string().contains("unknown option `creat`"));
/// assert!(error.to_string().contains("create, batch_size"));
/// # Ok::<(), cloudbus_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigUrl {
    redacted: String,
    scheme: String,
    path: String,
    options: BTreeMap<String, String>,
}

impl ConfigUrl {
    /// Splits `url`; fails when it has no `://`, a name that is not UTF-8, or an option
    /// given twice.
    pub fn parse(url: &str) -> Result<ConfigUrl> {
        let redacted = redact_url(url);
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::config(format!(
                "`{redacted}` is not a cloudbus URL: expected <scheme>://<name>, e.g. memory://orders"
            ))
        })?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| {
                Error::config(format!(
                    "the name in `{redacted}` is not valid UTF-8 after percent-decoding"
                ))
            })?
            .into_owned();
        let mut options = BTreeMap::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if options.insert(key.to_string(), value.to_string()).is_some() {
                return Err(Error::config(format!(
                    "option `{key}` is given twice in `{redacted}`"
                )));
            }
        }
        Ok(ConfigUrl {
            scheme: scheme.to_ascii_lowercase(),
            path,
            options,
            redacted,
        })
    }

    /// The scheme, lowercase: `memory`, `sqs`...
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The percent-decoded path: what follows `://` up to the `?`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The URL as given, with any `user:password@` replaced: safe in errors and logs.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The path, which must name an entity (`what`: `queue`, `topic`...).
    pub fn entity(&self, what: &str) -> Result<&str> {
        if self.path.is_empty() {
            return Err(Error::config(format!(
                "`{}` names no {what}: use {}://<{what}>",
                self.redacted, self.scheme
            )));
        }
        Ok(&self.path)
    }

    /// The path without a trailing `/$deadletter`, and whether it had one.
    pub fn dead_letter_path(&self) -> (&str, bool) {
        match self.path.strip_suffix(DEAD_LETTER_SUFFIX) {
            Some(base) => (base, true),
            None => (&self.path, false),
        }
    }

    /// Deserializes the transport's config struct from the query options plus `fields`
    /// (values taken from the path, such as the entity name). Values are text: booleans
    /// are `true`/`false` (also `1`/`0`, `yes`/`no`, and an empty value for `true`),
    /// numbers and durations are written as in TOML strings, enums by their names.
    /// Unknown options fail with the list of valid ones; a [`Secret`](super::Secret) field
    /// cannot be set from a URL.
    pub fn deserialize<T: DeserializeOwned>(&self, fields: &[(&str, &str)]) -> Result<T> {
        let mut entries: Vec<(&str, &str)> = Vec::with_capacity(self.options.len() + fields.len());
        for (name, value) in fields {
            if self.options.contains_key(*name) {
                return Err(Error::config(format!(
                    "`{}`: `{name}` comes from the URL's path; remove the `{name}` option",
                    self.redacted
                )));
            }
            entries.push((name, value));
        }
        entries.extend(self.options.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        T::deserialize(Query { entries }).map_err(|error| {
            let text = match error {
                QueryError::UnknownOption { option, expected } => {
                    let valid: Vec<&str> = expected
                        .iter()
                        .copied()
                        .filter(|name| !fields.iter().any(|(f, _)| f == name))
                        .collect();
                    format!(
                        "unknown option `{option}`; valid options for {}:// are: {}",
                        self.scheme,
                        valid.join(", ")
                    )
                }
                QueryError::Other(text) => text,
            };
            Error::config(format!("`{}`: {text}", self.redacted))
        })
    }
}

/// The options of a URL as a serde map.
struct Query<'a> {
    entries: Vec<(&'a str, &'a str)>,
}

/// Why a URL's options do not make the struct.
#[derive(Debug)]
enum QueryError {
    UnknownOption {
        option: String,
        expected: &'static [&'static str],
    },
    Other(String),
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::UnknownOption { option, .. } => write!(f, "unknown option `{option}`"),
            QueryError::Other(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for QueryError {}

impl de::Error for QueryError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        QueryError::Other(message.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        QueryError::UnknownOption {
            option: field.to_string(),
            expected,
        }
    }
}

impl<'de> de::Deserializer<'de> for Query<'de> {
    type Error = QueryError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
        visitor.visit_map(Options {
            entries: self.entries.into_iter(),
            value: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// The options, one at a time, for a struct's visitor.
struct Options<'a> {
    entries: std::vec::IntoIter<(&'a str, &'a str)>,
    value: Option<(&'a str, &'a str)>,
}

impl<'de> de::MapAccess<'de> for Options<'de> {
    type Error = QueryError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, QueryError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some((key, value));
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, QueryError> {
        let Some((key, value)) = self.value.take() else {
            return Err(QueryError::Other("an option without a value".into()));
        };
        seed.deserialize(Text(value)).map_err(|error| match error {
            QueryError::Other(text) => QueryError::Other(format!("`{key}`: {text}")),
            unknown => unknown,
        })
    }
}

/// One option's value: text, parsed into whatever the field's type asks for.
struct Text<'a>(&'a str);

impl Text<'_> {
    fn number<T: std::str::FromStr>(&self) -> Result<T, QueryError> {
        self.0
            .trim()
            .parse()
            .map_err(|_| QueryError::Other(format!("expected a number, got `{}`", self.0)))
    }
}

macro_rules! numbers {
    ($($method:ident => $visit:ident,)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
                visitor.$visit(self.number()?)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Text<'de> {
    type Error = QueryError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
        visitor.visit_borrowed_str(self.0)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
        match self.0.trim().to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "yes" => visitor.visit_bool(true),
            "false" | "0" | "no" => visitor.visit_bool(false),
            _ => Err(QueryError::Other(format!(
                "expected true or false, got `{}`",
                self.0
            ))),
        }
    }

    numbers! {
        deserialize_i8 => visit_i8,
        deserialize_i16 => visit_i16,
        deserialize_i32 => visit_i32,
        deserialize_i64 => visit_i64,
        deserialize_u8 => visit_u8,
        deserialize_u16 => visit_u16,
        deserialize_u32 => visit_u32,
        deserialize_u64 => visit_u64,
        deserialize_f32 => visit_f32,
        deserialize_f64 => visit_f64,
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, QueryError> {
        if name == SECRET_NAME {
            return Err(QueryError::Other(
                "is a secret, and a URL is no place for one (URLs end up in logs and shell \
                 history): set it in the configuration file or its environment variable"
                    .into(),
            ));
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, QueryError> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map
        struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::Deserialize;

    use super::*;
    use crate::config::Secret;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        PeekLock,
        ReceiveAndDelete,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Options {
        entity: String,
        flag: bool,
        count: u32,
        ratio: f64,
        name: Option<String>,
        #[serde(with = "crate::config::duration")]
        wait: Duration,
        #[serde(with = "crate::config::opt_duration")]
        visibility: Option<Duration>,
        mode: Mode,
        password: Option<Secret>,
    }

    impl Default for Options {
        fn default() -> Self {
            Options {
                entity: String::new(),
                flag: false,
                count: 7,
                ratio: 0.5,
                name: None,
                wait: Duration::from_secs(20),
                visibility: None,
                mode: Mode::PeekLock,
                password: None,
            }
        }
    }

    fn parse(url: &str) -> Result<Options> {
        let url = ConfigUrl::parse(url)?;
        url.deserialize(&[("entity", url.entity("queue")?)])
    }

    #[test]
    fn every_kind_of_value() {
        let options = parse(
            "x://orders?flag&count=3&ratio=0.25&name=a%20b&wait=500ms&visibility=2&mode=receive_and_delete",
        )
        .unwrap();
        assert_eq!(
            options,
            Options {
                entity: "orders".into(),
                flag: true,
                count: 3,
                ratio: 0.25,
                name: Some("a b".into()),
                wait: Duration::from_millis(500),
                visibility: Some(Duration::from_secs(2)),
                mode: Mode::ReceiveAndDelete,
                password: None,
            }
        );
        assert_eq!(
            parse("x://orders").unwrap(),
            Options {
                entity: "orders".into(),
                ..Options::default()
            }
        );
        assert!(!parse("x://q?flag=no").unwrap().flag);
    }

    #[test]
    fn errors_name_the_option_and_the_rule() {
        let text = |url: &str| parse(url).unwrap_err().to_string();
        let bad_bool = text("x://q?flag=maybe");
        assert!(
            bad_bool.contains("`flag`") && bad_bool.contains("true or false"),
            "{bad_bool}"
        );
        let bad_number = text("x://q?count=many");
        assert!(
            bad_number.contains("`count`") && bad_number.contains("number"),
            "{bad_number}"
        );
        let bad_duration = text("x://q?wait=soon");
        assert!(
            bad_duration.contains("`wait`") && bad_duration.contains("500ms"),
            "{bad_duration}"
        );
        let bad_enum = text("x://q?mode=fast");
        assert!(
            bad_enum.contains("`mode`") && bad_enum.contains("peek_lock"),
            "{bad_enum}"
        );
        let unknown = text("x://q?cuont=1");
        assert!(unknown.contains("unknown option `cuont`"), "{unknown}");
        assert!(
            unknown.contains("flag, count, ratio") && !unknown.contains("entity"),
            "path fields are not options: {unknown}"
        );
        let twice = text("x://q?count=1&count=2");
        assert!(twice.contains("given twice"), "{twice}");
        let from_path = text("x://q?entity=other");
        assert!(
            from_path.contains("comes from the URL's path"),
            "{from_path}"
        );
        assert!(text("x://").contains("names no queue"));
        assert!(text("orders").contains("not a cloudbus URL"));
    }

    #[test]
    fn secrets_are_refused_and_never_echoed() {
        let error = parse("x://q?password=hunter2").unwrap_err().to_string();
        assert!(
            error.contains("`password`") && error.contains("secret"),
            "{error}"
        );
        assert!(!error.contains("hunter2"), "{error}");
        // Another option's error must not quote the URL with the secret in it either.
        let error = parse("x://q?count=z&password=hunter2")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`count`") && !error.contains("hunter2"),
            "{error}"
        );
        let error = ConfigUrl::parse("x://user:hunter2@host/q?count=z")
            .unwrap()
            .deserialize::<Options>(&[])
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn dead_letter_paths() {
        let url = ConfigUrl::parse("x://orders/$deadletter").unwrap();
        assert_eq!(url.dead_letter_path(), ("orders", true));
        let url = ConfigUrl::parse("x://orders").unwrap();
        assert_eq!(url.dead_letter_path(), ("orders", false));
    }
}
