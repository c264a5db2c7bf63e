//! `hearth-controller run --config FILE`: parse arguments, set up logging, run, map the
//! outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hearth_controller::config::RawConfig;
use hearth_service::telemetry::{LogFormat, init_logging};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "hearth-controller", version, about = "Hearth controller: cluster view, placement and scaling")]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve agent streams and the read API.
    Run {
        /// YAML config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve plain-text gRPC with no client authentication. Only for trusted networks.
        #[arg(long)]
        insecure: bool,
        /// Override `listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Override `http_listen`.
        #[arg(long)]
        http_listen: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, "info");
    hearth_service::telemetry::run_main(run(cli.cmd))
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    let Cmd::Run { config, insecure, listen, http_listen } = cmd;
    let mut raw = match &config {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    raw.insecure |= insecure;
    if let Some(l) = listen {
        raw.listen = l;
    }
    if let Some(l) = http_listen {
        raw.http_listen = l;
    }
    let cfg = hearth_controller::Config::try_from(raw)?;
    let shutdown = CancellationToken::new();
    let running = hearth_controller::start(cfg, shutdown.clone()).await?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        hearth_service::telemetry::shutdown_signal().await;
        stop.cancel();
    });
    running.wait().await?;
    Ok(())
}
