//! The `hub` binary: parse the configuration, bind, and hand over to
//! [`hub::run`]. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use hub::auth::TokenHash;
use hub::config::{Cli, Command, Config, LogFormat, SecretSource};
use tokio::net::TcpListener;
use tokio::sync::watch;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => {
            // Before anything opens a file: every connection is one.
            let open_files = raise_open_files_limit();
            // Validated before any port is bound; errors name the option.
            let mut config = match Config::load(*args, &cli.global) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("hub: configuration error: {e}");
                    std::process::exit(2);
                }
            };
            init_logging(config.log_format);
            match open_files {
                Ok(limit) => {
                    tracing::info!(open_files = limit, "open-files limit");
                    if let Some(lowered) = config.settings.guard.fit_open_files(limit) {
                        tracing::warn!("{lowered}");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read or raise the open-files limit")
                }
            }
            runtime.block_on(serve(config))
        }
        Command::Client(cmd) => {
            let mut out = std::io::stdout();
            let result = runtime.block_on(hub::cli::run(&cli.global, cmd, &mut out));
            match result {
                // `hub events --follow | head`: the reader left; not an error.
                Err(hub::cli::CliError::Output(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    eprintln!("hub: error: {e}");
                    std::process::exit(e.exit_code());
                }
                Ok(()) => {}
            }
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // One hub per SQLite database: held until the process ends.
    let lock = hub::Store::lock_for_process(&config.database_url)
        .context("--database-url / DATABASE_URL")?;
    if let Some(lock) = &lock {
        tracing::debug!(file = %lock.path().display(), "holding the database's process lock");
    }
    // SIGINT or SIGTERM, heard by a standby and a serving hub alike.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    loop {
        match serve_once(&config, stopped.clone()).await {
            Err(e) if matches!(e.downcast_ref(), Some(hub::RunError::Deposed(_))) => {
                tracing::warn!(error = %e, "standing by again");
            }
            done => return done,
        }
    }
}

/// Opens the database and binds; while another hub leads, forwards calls
/// to it (a standby) and waits to lead; then serves until `stopped`, or
/// until another hub leads.
async fn serve_once(config: &Config, stopped: watch::Receiver<bool>) -> anyhow::Result<()> {
    let store = hub::Store::open_with(&config.database_url, config.store_options())
        .await
        .with_context(|| {
            format!(
                "opening the database (--database-url / DATABASE_URL: {})",
                hub::store::redacted_url(&config.database_url)
            )
        })?;
    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen (HUB_LISTEN) {}", config.listen))?;
    let http = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| {
            format!(
                "binding --http-listen (HUB_HTTP_LISTEN) {}",
                config.http_listen
            )
        })?;
    let grpc_addr = grpc.local_addr()?;
    let tls = config.settings.tls.is_some();
    tracing::info!(grpc = %grpc_addr, tls, http = %http.local_addr()?, database = %hub::store::redacted_url(&config.database_url), "hub listening");
    // Lets the CLI on this machine find the hub without flags (and know it
    // speaks TLS); a standby forwards its calls.
    let addr_file = config.data_dir.join("grpc.addr");
    let scheme = if tls { "https://" } else { "" };
    std::fs::write(&addr_file, format!("{scheme}{grpc_addr}\n"))
        .with_context(|| format!("writing {}", addr_file.display()))?;
    store.advertise(config.advertised_url(grpc_addr));
    let (grpc, http) = if store
        .lead_now()
        .await
        .context("trying to lead the database")?
    {
        (grpc, http)
    } else {
        // A standby: it forwards calls to the leader on copies of the
        // listeners until it leads, then serves on the originals.
        let (grpc, grpc_copy) = copy_listener(grpc)?;
        let (http, http_copy) = copy_listener(http)?;
        let follower =
            hub::replica::Follower::start(grpc_copy, http_copy, store.clone(), &config.settings)?;
        tracing::info!(
            "standby: another hub leads this database; forwarding calls to it and waiting to take over"
        );
        tokio::select! {
            led = store.lead() => led.context("waiting to lead the database")?,
            () = signalled(stopped.clone()) => {
                follower.stop().await;
                store.close().await;
                tracing::info!("hub stopped (it was standing by)");
                return Ok(());
            }
        }
        follower.stop().await;
        (grpc, http)
    };
    for (name, source) in [
        ("admin token", &config.admin_token_source),
        ("enrollment token", &config.enrollment_token_source),
    ] {
        match source {
            SecretSource::File(path) => tracing::info!("{name}: stored in {}", path.display()),
            SecretSource::Configured => tracing::info!("{name}: from configuration"),
        }
    }
    let secrets = hub::Secrets {
        admin_token: TokenHash::new(&config.admin_token),
        enrollment_token: TokenHash::new(&config.enrollment_token),
    };
    hub::run(
        grpc,
        http,
        store,
        config.settings.clone(),
        secrets,
        signalled(stopped),
    )
    .await?;
    tracing::info!("hub stopped");
    Ok(())
}

/// Two handles on one listening socket: a standby accepts on the copy, and
/// once it leads, the hub on the original, so clients keep the address.
fn copy_listener(listener: TcpListener) -> anyhow::Result<(TcpListener, TcpListener)> {
    let original = listener.into_std()?;
    let copy = original.try_clone()?;
    Ok((
        TcpListener::from_std(original)?,
        TcpListener::from_std(copy)?,
    ))
}

/// Completes once SIGINT or SIGTERM was received.
async fn signalled(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Raises the soft open-files limit (RLIMIT_NOFILE) to the hard one: the
/// common soft default of 1024 runs out long before the machine does.
/// Returns the limit now in force.
fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Logs to stderr, as text or JSON lines, filtered by `RUST_LOG`.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
