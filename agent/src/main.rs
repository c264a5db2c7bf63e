//! `hearth`: parse arguments, set up logging, run the subcommand, map the outcome to an
//! exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hearth_agent::config::{Config, RawConfig};
use hearth_controller::telemetry::{LogFormat, init_logging};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "hearth", version, about = "Hearth: keeps accelerator nodes ready to serve models")]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (the DaemonSet's process).
    Agent {
        /// YAML config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Report to the controller over plain text. Only for trusted networks.
        #[arg(long)]
        insecure: bool,
        /// Override `node_name` (default: $NODE_NAME, then the hostname).
        #[arg(long)]
        node_name: Option<String>,
        /// Override `controller.url`.
        #[arg(long)]
        controller: Option<String>,
        /// Override `http_listen`.
        #[arg(long)]
        http_listen: Option<String>,
    },
    /// Run a controller and an agent with simulated accelerators on this machine.
    Local {
        /// Where certificates, state and the cache go [default: ~/.local/state/hearth].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value = "local")]
        node_name: String,
        /// Simulated accelerators, e.g. 2xH100-80GB (repeatable).
        #[arg(long = "devices", default_value = "2xH100-80GB")]
        devices: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:7443")]
        controller_listen: String,
        #[arg(long, default_value = "127.0.0.1:9401")]
        controller_http_listen: String,
        #[arg(long, default_value = "127.0.0.1:9400")]
        agent_http_listen: String,
    },
    /// Show the cluster as the controller sees it.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        output: hearth_agent::status::Output,
        /// Controller URL; without it, the running `hearth local`.
        #[arg(long, env = "HEARTH_CONTROLLER")]
        controller: Option<String>,
        #[arg(long, env = "HEARTH_CA")]
        ca: Option<PathBuf>,
        #[arg(long, env = "HEARTH_CERT")]
        cert: Option<PathBuf>,
        #[arg(long, env = "HEARTH_KEY")]
        key: Option<PathBuf>,
        /// Name expected in the controller's certificate (default: the URL's host).
        #[arg(long)]
        server_name: Option<String>,
        #[arg(long)]
        insecure: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.cmd {
        // Status output is the product; keep logs out of it.
        Cmd::Status { .. } => "warn",
        Cmd::Local { .. } => "warn,hearth_agent=info,hearth_controller=info",
        Cmd::Agent { .. } => "info",
    };
    init_logging(cli.log_format, default_filter);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match cmd {
        Cmd::Agent { config, insecure, node_name, controller, http_listen } => {
            let mut raw = match &config {
                Some(p) => RawConfig::from_file(p)?,
                None => RawConfig::default(),
            };
            raw.controller.insecure |= insecure;
            raw.node_name = node_name.or(raw.node_name);
            raw.controller.url = controller.or(raw.controller.url);
            raw.http_listen = http_listen.or(raw.http_listen);
            let cfg = Config::try_from(raw)?;
            let agent = hearth_agent::daemon::start(cfg, shutdown.clone()).await?;
            spawn_signal_handler(shutdown);
            agent.wait().await?;
        }
        Cmd::Local { state_dir, node_name, devices, controller_listen, controller_http_listen, agent_http_listen } => {
            spawn_signal_handler(shutdown.clone());
            let args = hearth_agent::local::LocalArgs {
                state_dir: state_dir.unwrap_or_else(hearth_agent::local::default_state_dir),
                node_name,
                devices,
                controller_listen,
                controller_http_listen,
                agent_http_listen,
            };
            hearth_agent::local::run(args, shutdown).await?;
        }
        Cmd::Status { output, controller, ca, cert, key, server_name, insecure, state_dir } => {
            let args = hearth_agent::status::StatusArgs {
                controller,
                ca,
                cert,
                key,
                server_name,
                insecure,
                output,
                state_dir: state_dir.unwrap_or_else(hearth_agent::local::default_state_dir),
            };
            hearth_agent::status::run(args).await?;
        }
    }
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        hearth_controller::telemetry::shutdown_signal().await;
        shutdown.cancel();
    });
}
