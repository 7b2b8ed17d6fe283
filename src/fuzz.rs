//! Fuzz targets (property tests) for configuration: URLs and serde configs of every
//! transport the build has, built from arbitrary text and from the real option names with
//! arbitrary values, parse to a config or an error, never a panic. Cases: `PROPTEST_CASES`
//! (256 by default); RELIABILITY.md gives the long run.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::Config;

/// Each scheme and the options it takes (README, Configuration), and one none knows.
const SCHEMES: &[(&str, &[&str])] = &[
    (
        "memory",
        &[
            "create",
            "visibility",
            "max_deliveries",
            "capacity",
            "max_message_size",
            "start",
            "subscription",
        ],
    ),
    (
        "sqs",
        &[
            "region",
            "endpoint",
            "create",
            "max_receive_count",
            "wait",
            "visibility",
            "batching",
            "linger",
            "batch_size",
        ],
    ),
    (
        "sns",
        &[
            "region",
            "endpoint",
            "create",
            "subscription",
            "wait",
            "visibility",
            "batching",
            "linger",
            "batch_size",
        ],
    ),
    (
        "servicebus",
        &[
            "subscription",
            "receive_mode",
            "prefetch",
            "sessions",
            "session",
            "max_message_size",
            "batching",
            "batch_size",
            "receivers",
            "namespace",
            "credential",
            "client_id",
        ],
    ),
    (
        "kafka",
        &[
            "subscription",
            "dead_letter",
            "brokers",
            "create",
            "partitions",
            "replication",
            "start",
            "visibility",
            "max_deliveries",
            "max_message_size",
            "commit_interval",
            "max_buffered",
            "session_timeout",
            "publish_timeout",
            "linger",
            "auth",
            "tls",
            "tls_ca",
            "username",
            "region",
        ],
    ),
    (
        "rabbitmq",
        &[
            "subscription",
            "dead_letter",
            "create",
            "visibility",
            "max_deliveries",
            "max_message_size",
            "prefetch",
            "max_held",
            "publish_timeout",
        ],
    ),
    ("nats", &["password", "connection_string", "uri", "nope"]),
];

/// A scheme and options drawn mostly from its own.
fn scheme_and_options() -> impl Strategy<Value = (&'static str, Vec<(&'static str, String)>)> {
    prop::sample::select(SCHEMES).prop_flat_map(|(scheme, names)| {
        let name = prop_oneof![
            9 => prop::sample::select(names),
            1 => prop::sample::select(SCHEMES[6].1),
        ];
        (Just(scheme), vec((name, value()), 0..4))
    })
}

/// A value as users write them, or anything.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        1 => Just("true".to_string()),
        1 => Just("0".to_string()),
        4 => "-?[0-9]{1,25}(\\.[0-9]{0,12})?(ns|ms|s|m|h|d)?",
        1 => "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}(Z|[+-][0-9]{2}:[0-9]{2})",
        1 => "(earliest|latest|peek_lock|receive_and_delete|plain|msk_iam|event_hubs|developer)",
        1 => "[ -~]{0,40}",
        1 => any::<String>(),
    ]
}

fn url() -> impl Strategy<Value = String> {
    let entity = prop_oneof![4 => "[a-z0-9._-]{1,20}(/\\$deadletter)?", 1 => any::<String>()];
    (
        scheme_and_options(),
        prop_oneof![8 => Just("://"), 1 => Just(":"), 1 => Just(":///")],
        entity,
    )
        .prop_map(|((scheme, options), separator, entity)| {
            // A bare name is `true`; `name=` an empty value.
            let options: Vec<String> = options
                .into_iter()
                .map(|(name, value)| match value.as_str() {
                    "true" => name.to_string(),
                    _ => format!("{name}={value}"),
                })
                .collect();
            if options.is_empty() {
                format!("{scheme}{separator}{entity}")
            } else {
                format!("{scheme}{separator}{entity}?{}", options.join("&"))
            }
        })
}

proptest! {
    #[test]
    fn fuzz_arbitrary_text_is_a_config_or_an_error(text in any::<String>()) {
        let _ = Config::from_url(&text);
    }

    #[test]
    fn fuzz_urls_with_real_options_are_a_config_or_an_error(url in url()) {
        let _ = Config::from_url(&url);
    }

    #[test]
    fn fuzz_serde_configs_are_a_config_or_an_error(
        (transport, options) in scheme_and_options(),
        entity in any::<String>(),
        kinds in vec(0u8..4, 4),
    ) {
        let mut json = serde_json::json!({ "transport": transport, "entity": entity });
        for ((name, value), kind) in options.into_iter().zip(kinds) {
            json[name] = match kind {
                0 => serde_json::Value::String(value),
                1 => value.parse::<f64>().map_or(serde_json::Value::Null, serde_json::Value::from),
                2 => serde_json::Value::Bool(value.len() % 2 == 0),
                _ => serde_json::json!([value]),
            };
        }
        let _ = serde_json::from_value::<Config>(json);
    }
}
