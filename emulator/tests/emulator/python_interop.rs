//! Interop with the official Python SDK `azure-servicebus` (pinned in
//! tests/python/requirements.txt). Needs the venv made by
//! `emulator/scripts/python-venv`; each scenario runs against its own emulator.

use crate::common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SERVICEBUS_PY") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = std::env::var_os("SERVICEBUS_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/servicebus-py-venv"));
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} is missing: run emulator/scripts/python-venv first",
        py.display()
    );
    py
}

async fn scenario(name: &str) {
    let emulator = common::start_ephemeral(common::topology()).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/interop.py");
    // Output goes to files so that it can be shown even when the scenario hangs and is killed.
    let dir = std::env::temp_dir().join(format!(
        "servicebus-emulator-py-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = tokio::process::Command::new(python())
        .arg(&script)
        .arg(name)
        .arg(emulator.connection_string())
        .stdout(Stdio::from(
            std::fs::File::create(&out_path).expect("stdout file"),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(&err_path).expect("stderr file"),
        ))
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let status = tokio::time::timeout(Duration::from_secs(300), child.wait()).await;
    if status.is_err() {
        let _ = child.kill().await;
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let status = match status {
        Ok(s) => s.expect("python runs").to_string(),
        Err(_) => "killed after 300 s".to_string(),
    };
    assert!(
        stdout.contains(&format!("PASS {name}")),
        "python scenario {name} failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    emulator.shutdown().await;
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                scenario(stringify!($name)).await;
            }
        )*
    };
}

scenarios!(
    send_and_receive_and_delete,
    peek_lock_complete,
    abandon_redelivers,
    dead_letter_with_reason,
    defer_and_receive_by_sequence,
    renew_lock,
    lock_expiry_redelivers,
    max_delivery_count_dead_letters,
    schedule_and_cancel,
    peek,
    topic_fan_out,
    correlation_and_sql_filters,
    ttl_expiry,
    sessions,
    session_lock_conflict_and_timeout,
    duplicate_detection,
    message_size_limit,
    ten_thousand,
);
