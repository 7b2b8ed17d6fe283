//! The `servicebus-emulator` binary: reads Config.json, prints the connection string, serves.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_servicebus-emulator");

/// Kills the child when the test ends, whatever happens.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serves_the_official_config_and_prints_the_connection_string() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/Config.json");
    let mut child = Child(
        Command::new(BIN)
            .args([
                "--config",
                config,
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("binary starts"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a line");
    let endpoint = line
        .strip_prefix("Endpoint=sb://")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("unexpected output: {line}"));
    assert!(line.contains("UseDevelopmentEmulator=true;"), "{line}");
    let mut s = TcpStream::connect(endpoint).expect("the printed endpoint accepts connections");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"AMQP\x00\x01\x00\x00").expect("write");
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).expect("protocol header back");
    assert_eq!(&reply, b"AMQP\x00\x01\x00\x00");
}

#[test]
fn invalid_config_exits_with_an_error() {
    let dir = std::env::temp_dir().join(format!("servicebus-emulator-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("Config.json");
    std::fs::write(&path, "{ \"UserConfig\": { \"Namespaces\": [ { \"Queues\": [ { \"Name\": \"q\", \"Properties\": { \"LockDuration\": \"one minute\" } } ] } ] } }")
        .expect("write config");
    let out = Command::new(BIN)
        .args([
            "--config",
            path.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("binary runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ISO 8601"));
}
