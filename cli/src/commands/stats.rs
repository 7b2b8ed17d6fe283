//! `cloudbus stats`: the counts the transport reports, and for each one it does not,
//! why.

use crate::exit::Failure;
use crate::output::{Output, table};
use crate::target::Target;

pub async fn run(target: Target, output: &Output) -> Result<u8, Failure> {
    let inspector = target
        .config
        .connect_inspector()
        .await
        .map_err(|e| Failure::of("connecting to", &target.shown, e))?;
    let stats = inspector.stats().await;
    let _ = inspector.close().await;
    let stats = stats.map_err(|e| Failure::of("reading the counts of", &target.shown, e))?;
    let why = |field: &str| {
        stats
            .not_reported
            .iter()
            .find(|(f, _)| *f == field)
            .map_or("not reported", |(_, why)| why.as_str())
            .to_string()
    };
    if output.json {
        let not_reported: serde_json::Map<String, serde_json::Value> = stats
            .not_reported
            .iter()
            .map(|(f, why)| (f.to_string(), why.clone().into()))
            .collect();
        output.json_line(&serde_json::json!({
            "target": target.shown,
            "transport": target.config.transport(),
            "waiting": stats.waiting,
            "in_flight": stats.in_flight,
            "dead_lettered": stats.dead_lettered,
            "oldest_age_seconds": stats.oldest_age.map(|a| a.as_secs_f64()),
            "not_reported": not_reported,
        }));
        return Ok(0);
    }
    let count = |value: Option<u64>, field: &str| {
        value.map_or_else(|| format!("- ({})", why(field)), |v| v.to_string())
    };
    let rows = vec![
        vec!["waiting".to_string(), count(stats.waiting, "waiting")],
        vec!["in flight".to_string(), count(stats.in_flight, "in_flight")],
        vec![
            "dead-lettered".to_string(),
            count(stats.dead_lettered, "dead_lettered"),
        ],
        vec![
            "oldest age".to_string(),
            stats.oldest_age.map_or_else(
                || format!("- ({})", why("oldest_age")),
                |age| {
                    humantime::format_duration(std::time::Duration::from_secs(age.as_secs()))
                        .to_string()
                },
            ),
        ],
    ];
    println!("{} ({})", target.shown, target.config.transport());
    table(&["", ""], &rows);
    Ok(0)
}
