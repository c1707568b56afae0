//! The data directory and the database are private to the hub's user: the
//! directory is created 0700, `hub.db` and its `-wal` and `-shm` files are
//! 0600 (SQLite gives the latter the database file's mode), and database
//! files an older hub left readable are made private when it opens them.
#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use clap::Parser;
use hub::Store;
use hub::auth::TokenHash;
use hub::config::{Cli, Command, Config};
use hub::store::Durability;
use hub_proto::v1 as proto;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use tokio::net::TcpListener;

use crate::support::*;

fn mode(path: &Path) -> u32 {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_hub_on_a_fresh_data_dir_keeps_it_and_its_database_private() {
    if hub::testing::skip_on_postgres("the modes of SQLite's files") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("hub-data");
    let argv = [
        "hub",
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    let cli = Cli::try_parse_from(argv).unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("not serve");
    };
    // What `hub serve` does: the configuration (which creates the data
    // dir), the store, the listeners, the hub.
    let config = Config::load(*args, &cli.global).unwrap();
    let store = Store::open(&config.database_url, config.durability)
        .await
        .unwrap();
    let grpc = TcpListener::bind(config.listen).await.unwrap();
    let http = TcpListener::bind(config.http_listen).await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let enrollment = config.enrollment_token.clone();
    let secrets = hub::Secrets {
        admin_token: TokenHash::new(&config.admin_token),
        enrollment_token: TokenHash::new(&config.enrollment_token),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(hub::run(
        grpc,
        http,
        store,
        config.settings,
        secrets,
        async move {
            let _ = stopped.await;
        },
    ));

    // A write: Register answers after its commit.
    let mut spokes = SpokeServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = proto::RegisterRequest {
        name: "billing".into(),
        ..Default::default()
    };
    spokes.register(authed(req, &enrollment)).await.unwrap();

    assert_eq!(mode(&data), 0o700, "the data directory");
    for file in [
        "hub.db",
        "hub.db-wal",
        "hub.db-shm",
        "admin.token",
        "enrollment.token",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn database_files_readable_by_others_are_made_private_at_open() {
    if hub::testing::skip_on_postgres("the modes of SQLite's files") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db");
    let url = format!("sqlite://{}", db.display());
    // Kept open, so its -wal and -shm files exist.
    let first = Store::open(&url, Durability::Full).await.unwrap();
    let files = ["hub.db", "hub.db-wal", "hub.db-shm"].map(|f| dir.path().join(f));
    for file in &files {
        set_mode(file, 0o644);
    }
    set_mode(dir.path(), 0o755);

    let second = Store::open(&url, Durability::Full).await.unwrap();
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    // A directory others can read is the operator's choice: warned about,
    // left alone.
    assert_eq!(mode(dir.path()), 0o755);
    second.close().await;
    first.close().await;
}
