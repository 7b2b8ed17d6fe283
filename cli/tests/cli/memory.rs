//! The memory transport, and what holds on every transport: usage errors and exit codes.
//! A fresh process has an empty in-process broker, so only sending and empty reads mean
//! something here.

use crate::common::{cloudbus, unique};

#[test]
fn send_prints_an_id_per_message_in_order() {
    let url = format!("memory://{}", unique("cli"));
    let run = cloudbus(&["send", &url, "a", "b", "c"], &[], None).expect(0);
    let ids: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{run:#?}");
    assert!(ids.iter().all(|id| id.len() == 36), "{run:#?}");
    let run = cloudbus(&["send", &url, "--json"], &[], Some("one\n\ntwo\n")).expect(0);
    assert_eq!(run.json().len(), 2, "blank lines are skipped: {run:#?}");
}

#[test]
fn generated_load_reports_its_rate() {
    let url = format!("memory://{}", unique("cli"));
    let run = cloudbus(&["send", &url, "--count", "500"], &[], None).expect(0);
    assert!(run.stdout.is_empty(), "--count prints no ids: {run:#?}");
    assert!(run.stderr.contains("sent 500 messages"), "{run:#?}");
}

#[test]
fn an_empty_queue_receives_nothing_and_succeeds() {
    let url = format!("memory://{}", unique("cli"));
    let run = cloudbus(&["receive", &url, "--idle-timeout", "200ms"], &[], None).expect(0);
    assert!(run.stdout.is_empty(), "{run:#?}");
    assert!(
        run.stderr.contains("received and acked 0 messages"),
        "{run:#?}"
    );
}

#[test]
fn inspecting_an_entity_of_another_process_is_not_found() {
    let url = format!("memory://{}", unique("cli"));
    let run = cloudbus(&["stats", &url], &[], None).expect(4);
    assert!(
        run.stderr.contains("does not exist") || run.stderr.contains("not found"),
        "{run:#?}"
    );
}

#[test]
fn bad_input_exits_3_naming_the_problem() {
    let run = cloudbus(&["send"], &[], None).expect(3);
    assert!(
        run.stderr.contains("--url") && run.stderr.contains("CLOUDBUS_URL"),
        "{run:#?}"
    );
    let run = cloudbus(&["send", "nope://x", "a"], &[], None).expect(3);
    assert!(run.stderr.contains("unknown transport `nope`"), "{run:#?}");
    let run = cloudbus(&["send", "memory://x", "--attr", "novalue", "a"], &[], None).expect(3);
    assert!(
        run.stderr.contains("--attr `novalue` is not key=value"),
        "{run:#?}"
    );
    let run = cloudbus(&["send", "memory://x", "--base64", "%%%"], &[], None).expect(3);
    assert!(run.stderr.contains("not base64"), "{run:#?}");
    let run = cloudbus(
        &["receive", "memory://x", "--idle-timeout", "soon"],
        &[],
        None,
    )
    .expect(2);
    assert!(run.stderr.contains("not a duration"), "{run:#?}");
}

#[test]
fn the_url_comes_from_the_environment_or_a_config_file() {
    let queue = unique("cli");
    let url = format!("memory://{queue}");
    cloudbus(&["send", "x"], &[("CLOUDBUS_URL", &url)], None).expect(0);
    let dir = std::env::temp_dir().join(unique("cloudbus-cli"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("service.toml");
    std::fs::write(
        &file,
        format!("[http]\nport = 8080\n\n[bus]\ntransport = \"memory\"\nentity = \"{queue}\"\n"),
    )
    .expect("write");
    let path = file.display().to_string();
    cloudbus(&["--config", &path, "send", "x"], &[], None).expect(0);
    std::fs::write(
        &file,
        "[bus]\ntransport = \"memory\"\nentity = \"q\"\nvisibilty = 3\n",
    )
    .expect("write");
    let run = cloudbus(&["--config", &path, "send", "x"], &[], None).expect(3);
    assert!(run.stderr.contains("visibilty"), "{run:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redrive_of_a_memory_subscription_is_refused_with_the_way_out() {
    let url = format!("memory://{}?subscription=audit", unique("cli"));
    let run = cloudbus(&["dlq", "redrive", &url], &[], None).expect(7);
    assert!(run.stderr.contains("every subscription"), "{run:#?}");
}
