//! One hub per SQLite database: a second `hub serve` on a data directory a
//! running hub serves from refuses to start, with a message that says why
//! and what to do, and leaves the running hub alone. A hub killed with
//! SIGKILL leaves no stale lock behind.
#![cfg(unix)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tonic::transport::Channel;

fn serve(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hub"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir)
    .env_remove("DATABASE_URL");
    cmd
}

/// Starts a hub on `dir` and waits until it accepts gRPC connections.
async fn start(dir: &Path) -> (Child, String) {
    let addr_file = dir.join("grpc.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut child = serve(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the hub binary");
    for _ in 0..500 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the hub exited at start"
        );
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            let addr = format!("http://{}", addr.trim());
            if Channel::from_shared(addr.clone())
                .unwrap()
                .connect()
                .await
                .is_ok()
            {
                return (child, addr);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the hub did not start within 10 s");
}

/// Runs a second hub on `dir` to its end (it must not keep running).
fn second(dir: &Path) -> Output {
    let mut child = serve(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("a second hub on the same data directory kept running");
}

#[tokio::test]
async fn a_second_hub_on_the_same_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, addr) = start(dir.path()).await;

    let out = second(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second hub: {stderr}");
    assert!(
        stderr.contains("another hub is already serving from")
            && stderr.contains("hub.db.lock")
            && stderr.contains("postgres"),
        "the message says who holds the database and what to do: {stderr}"
    );
    // The first one never noticed.
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first hub is still running"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("grpc.addr"))
            .unwrap()
            .trim(),
        addr.trim_start_matches("http://"),
        "the second hub did not take over the address file"
    );
    Channel::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .expect("the first hub still serves");

    // A killed hub holds nothing: the next one starts at once.
    first.kill().unwrap();
    first.wait().unwrap();
    let (mut next, _) = start(dir.path()).await;
    next.kill().unwrap();
    next.wait().unwrap();
}
