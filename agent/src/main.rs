//! `hearth`: parse arguments, set up logging, run the subcommand, map the outcome to an
//! exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hearth_agent::config::{Config, RawConfig};
use hearth_service::telemetry::{LogFormat, init_logging};
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
    #[cfg(feature = "local")]
    Local {
        /// Where certificates, state and the cache go [default: ~/.local/state/hearth].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value = "local")]
        node_name: String,
        /// Simulated accelerators, e.g. 3xH100-80GB (repeatable); the sample model server
        /// takes one GPU.
        #[arg(long = "devices", default_value = "3xH100-80GB")]
        devices: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:7443")]
        controller_listen: String,
        #[arg(long, default_value = "127.0.0.1:9401")]
        controller_http_listen: String,
        #[arg(long, default_value = "127.0.0.1:9400")]
        agent_http_listen: String,
        /// The kube-scheduler extender (HTTPS); port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:7444")]
        extender_listen: String,
        /// The sample workload's serving port (run as root); 0 picks a free one.
        #[arg(long, default_value_t = 7480)]
        sample_port: u16,
        /// Most requests at once the sample load sends to the sample model server (it
        /// rises and falls over two minutes); 0 sends none.
        #[arg(long, default_value_t = 12)]
        sample_load: u32,
    },
    /// Download a model into the local cache, verified and resumable (no controller needed).
    Prefetch {
        /// s3://bucket/prefix/ or file:///path/
        uri: String,
        /// Cache root [default: $HEARTH_CACHE_DIR, /var/lib/hearth/cache as root, else ~/.cache/hearth].
        #[arg(long)]
        dest: Option<PathBuf>,
        /// Only files matching (repeatable), e.g. '*.safetensors'.
        #[arg(long)]
        include: Vec<String>,
        #[arg(long)]
        exclude: Vec<String>,
        #[arg(long, default_value = "")]
        revision: String,
        /// Bytes per ranged read.
        #[arg(long, default_value = "8Mi")]
        part_size: String,
        /// Reads in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// auto (O_DIRECT where supported), direct or buffered.
        #[arg(long, default_value = "auto")]
        write_mode: String,
        /// S3-compatible endpoint (AWS_ENDPOINT_URL_S3 also works).
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Bandwidth limit in bytes per second, e.g. 200Mi.
        #[arg(long)]
        limit_rate: Option<String>,
        /// A part read that takes longer is abandoned and issued again.
        #[arg(long, default_value = "30s")]
        stall_timeout: String,
    },
    /// Container images in the node's containerd: pull one the fast way, list them.
    Images {
        #[command(subcommand)]
        cmd: ImagesCmd,
    },
    /// Inspect the local cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Partition accelerators from a declarative spec (MIG).
    Partition {
        #[command(subcommand)]
        cmd: PartitionCmd,
    },
    /// Look at this host's NVIDIA GPUs through NVML (read-only).
    Gpu {
        #[command(subcommand)]
        cmd: GpuCmd,
    },
    /// A stand-in for AWS's neuron-monitor over a simulated Neuron driver tree: one JSON
    /// report per line every period (the agent runs it in simulation).
    #[command(hide = true)]
    NeuronMonitorSim {
        /// The fake sysfs root the agent wrote.
        #[arg(long)]
        sysfs: PathBuf,
        #[arg(long)]
        instance_type: String,
        #[arg(long, default_value = "i-sim")]
        instance_id: String,
        #[arg(long, default_value = "5s")]
        period: String,
    },
    /// A small OpenAI-compatible model server with vLLM's metrics: what `hearth local` runs
    /// as its agent-managed runtime (no inference: it paces made-up tokens).
    SampleServer {
        #[arg(long)]
        port: u16,
        /// The model id it lists and reports.
        #[arg(long, default_value = "sample")]
        model: String,
        /// The weights it reads (every *.safetensors file) before it is ready.
        #[arg(long)]
        model_dir: Option<PathBuf>,
        /// Or read them from s3://bucket/prefix/ itself (AWS environment for credentials
        /// and endpoint), as an engine's own loader would.
        #[arg(long, conflicts_with = "model_dir")]
        model_uri: Option<String>,
        /// Time per generated token.
        #[arg(long, default_value = "20ms")]
        token_time: String,
        /// Requests generated at once; more wait in its queue.
        #[arg(long, default_value_t = 4)]
        max_batch: usize,
    },
    /// `hearth local`'s sample network workload (internal).
    #[command(name = "__sample-net", hide = true)]
    SampleNet { role: String, addr: std::net::SocketAddr },
    /// Call any controller RPC with a JSON request (grpcurl's format); no METHOD lists them.
    /// Without --controller it reaches the running `hearth local`.
    Call {
        /// e.g. hearth.v1.Placement/Score, hearth.v1.Scaling/Recommend,
        /// externalscaler.ExternalScaler/GetMetrics.
        method: Option<String>,
        /// The request as proto3 JSON, e.g. '{"model": "llama-sample"}'.
        #[arg(short = 'd', long = "data", default_value = "")]
        data: String,
        /// Stop a stream (Watch, StreamIsActive) after this many messages.
        #[arg(long)]
        max_messages: Option<u64>,
        /// Stop after this long, e.g. 60s.
        #[arg(long)]
        max_time: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Model servers: list them (from the controller), or print an agent-managed one's log.
    Runtime {
        #[command(subcommand)]
        cmd: RuntimeCmd,
    },
    /// Show the cluster as the controller sees it.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        output: hearth_agent::status::Output,
        #[command(flatten)]
        conn: Conn,
    },
}

/// How `status` and `call` reach a controller: flags, or a running `hearth local`.
#[derive(clap::Args)]
struct Conn {
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
}

impl Conn {
    fn into_args(self, output: hearth_agent::status::Output) -> hearth_agent::status::StatusArgs {
        hearth_agent::status::StatusArgs {
            controller: self.controller,
            ca: self.ca,
            cert: self.cert,
            key: self.key,
            server_name: self.server_name,
            insecure: self.insecure,
            output,
            state_dir: self.state_dir.unwrap_or_else(hearth_agent::local::default_state_dir),
        }
    }
}

#[derive(Subcommand)]
enum RuntimeCmd {
    /// Every model server the controller knows of: state, load, measured start.
    Ls {
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: hearth_agent::status::Output,
        #[command(flatten)]
        conn: Conn,
    },
    /// The captured output of an agent-managed server (run on its node).
    Logs {
        name: String,
        /// The agent's state_dir.
        #[arg(long, default_value = "/var/lib/hearth")]
        agent_state_dir: PathBuf,
        #[arg(long, default_value_t = 100)]
        lines: usize,
    },
}

#[derive(Subcommand)]
enum PartitionCmd {
    /// Print the ordered plan that would bring the GPUs to a spec's config. Read-only.
    Plan {
        /// Spec file (mig-parted format).
        #[arg(long)]
        spec: PathBuf,
        /// Which named config of the spec.
        #[arg(long)]
        config: String,
        /// Plan against simulated GPUs, e.g. 8xH100-80GB (repeatable), or a Neuron instance
        /// type, e.g. inf2.48xlarge, for the config's neuron-configs.
        #[arg(long)]
        simulate: Vec<String>,
    },
}

#[derive(Subcommand)]
enum GpuCmd {
    /// GPUs, MIG devices, processes and memory health, as the agent reports them.
    Inventory {
        #[arg(long)]
        json: bool,
        /// Simulated products instead of NVML, e.g. 2xH100-80GB.
        #[arg(long)]
        simulate: Vec<String>,
    },
    /// One rendering of the dcgm-exporter-compatible metrics (after two sweeps, for GPM).
    Metrics {
        #[arg(long)]
        simulate: Vec<String>,
        /// Value of the Hostname label.
        #[arg(long, default_value = "localhost")]
        hostname: String,
    },
    /// NVML's possible MIG placements per profile against the planner's table (read-only).
    Profiles,
    /// Time the collection sweep against a loop of the raw NVML calls it makes.
    Bench {
        #[arg(long, default_value_t = 200)]
        rounds: u32,
        /// Pause between rounds.
        #[arg(long, default_value = "20ms")]
        pause: String,
    },
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// Pull an image into containerd as the agent does: blobs fetched with parallel ranged
    /// GETs and served to containerd's CRI pull as a mirror on loopback (or, when containerd
    /// does not read --hosts-dir, written into its content store), then unpacked by CRI; a
    /// plain CRI pull if that fails.
    Pull {
        reference: String,
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        containerd_socket: PathBuf,
        /// containerd namespace (the kubelet's is k8s.io).
        #[arg(long, default_value = "k8s.io")]
        namespace: String,
        /// Registry credentials, Docker config.json format.
        #[arg(long)]
        auth_file: Option<PathBuf>,
        /// Registries reached over plain HTTP (repeatable; loopback ones always are).
        #[arg(long)]
        insecure_registry: Vec<String>,
        /// Connections for the ranged fetch; 0: a plain CRI pull.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Bytes per ranged GET.
        #[arg(long, default_value = "8Mi")]
        chunk_size: String,
        /// A registry giving one connection more than this (bytes/s) is pulled by containerd
        /// directly; 0: never.
        #[arg(long, default_value = "200M")]
        direct_above: String,
        /// containerd's registry host directory (its CRI registry.config_path).
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        hosts_dir: PathBuf,
        /// Write blobs through containerd's content API instead of serving them as a mirror.
        #[arg(long)]
        no_mirror: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Images the runtime has, and who pins them.
    Ls {
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        containerd_socket: PathBuf,
        #[arg(long, default_value = "k8s.io")]
        namespace: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cached models.
    Ls {
        #[arg(long)]
        dest: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Write hearth-manifest.json (per-file SHA-256) into a model directory before uploading it.
    Manifest { dir: PathBuf },
    /// Write a sample model (config, tokenizer, safetensors shards) to try the cache with.
    Sample {
        dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        #[arg(long, default_value = "64Mi")]
        shard_size: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.cmd {
        // Status output is the product; keep logs out of it.
        Cmd::Status { .. }
        | Cmd::Runtime { .. }
        | Cmd::Call { .. }
        | Cmd::Prefetch { .. }
        | Cmd::Cache { .. }
        | Cmd::Images { .. }
        | Cmd::Partition { .. }
        | Cmd::Gpu { .. } => "warn",
        #[cfg(feature = "local")]
        Cmd::Local { .. } => "warn,hearth_agent=info,hearth_controller=info",
        Cmd::Agent { .. } => "info",
        Cmd::SampleNet { .. } => "warn",
        Cmd::SampleServer { .. } => "warn",
        Cmd::NeuronMonitorSim { .. } => "warn",
    };
    init_logging(cli.log_format, default_filter);
    hearth_service::telemetry::run_main(run(cli.cmd))
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
        #[cfg(feature = "local")]
        Cmd::Local {
            state_dir,
            node_name,
            devices,
            controller_listen,
            controller_http_listen,
            agent_http_listen,
            extender_listen,
            sample_port,
            sample_load,
        } => {
            spawn_signal_handler(shutdown.clone());
            let args = hearth_agent::local::LocalArgs {
                state_dir: state_dir.unwrap_or_else(hearth_agent::local::default_state_dir),
                node_name,
                devices,
                controller_listen,
                controller_http_listen,
                agent_http_listen,
                extender_listen,
                sample_port,
                sample_load,
            };
            hearth_agent::local::run(args, shutdown).await?;
        }
        Cmd::Prefetch {
            uri,
            dest,
            include,
            exclude,
            revision,
            part_size,
            concurrency,
            write_mode,
            endpoint,
            region,
            quiet,
            limit_rate,
            stall_timeout,
        } => {
            let stall_timeout = hearth_service::config::parse_duration("--stall-timeout", &stall_timeout)?;
            let limit_rate = limit_rate.map(|r| hearth_service::config::parse_size("--limit-rate", &r)).transpose()?;
            let part_size = hearth_service::config::parse_size("--part-size", &part_size)?;
            if !(64 << 10..=(1 << 30)).contains(&part_size) {
                anyhow::bail!("--part-size: expected between 64Ki and 1Gi, got {part_size}");
            }
            if concurrency == 0 || concurrency > 1024 {
                anyhow::bail!("--concurrency: expected 1 to 1024, got {concurrency}");
            }
            let write_mode = match write_mode.as_str() {
                "auto" => hearth_agent::cache::fetch::WriteMode::Auto,
                "direct" => hearth_agent::cache::fetch::WriteMode::Direct,
                "buffered" => hearth_agent::cache::fetch::WriteMode::Buffered,
                other => {
                    anyhow::bail!("--write-mode: expected auto, direct or buffered, got {other:?}")
                }
            };
            spawn_signal_handler(shutdown.clone());
            let args = hearth_agent::prefetch::PrefetchArgs {
                uri,
                dest: dest.unwrap_or_else(hearth_agent::cache::default_root),
                include,
                exclude,
                revision,
                part_size: part_size as usize,
                concurrency,
                write_mode,
                s3: hearth_agent::cache::source::s3::S3Options { endpoint, region, force_path_style: None },
                progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                limit_rate,
                stall_timeout,
            };
            hearth_agent::prefetch::prefetch(args, shutdown).await?;
        }
        Cmd::Partition { cmd: PartitionCmd::Plan { spec, config, simulate } } => {
            print!("{}", hearth_agent::partition::plan_command(&spec, &config, &simulate)?);
        }
        Cmd::Gpu { cmd } => {
            use hearth_agent::gpu_cli;
            let every = std::time::Duration::from_millis(500);
            match cmd {
                GpuCmd::Inventory { json, simulate } => {
                    let b = gpu_cli::backend(&simulate)?;
                    let (_, v) = tokio::task::spawn_blocking(move || gpu_cli::collect(b, 1, every, "localhost")).await??;
                    println!("{}", if json { gpu_cli::inventory_json(&v)? } else { gpu_cli::inventory_text(&v) });
                }
                GpuCmd::Metrics { simulate, hostname } => {
                    let b = gpu_cli::backend(&simulate)?;
                    let (m, _) = tokio::task::spawn_blocking(move || gpu_cli::collect(b, 2, every, &hostname)).await??;
                    print!("{}", gpu_cli::metrics_text(&m));
                }
                GpuCmd::Profiles => print!("{}", tokio::task::spawn_blocking(gpu_cli::profiles_report).await??),
                GpuCmd::Bench { rounds, pause } => {
                    let pause = hearth_service::config::parse_duration("--pause", &pause)?;
                    let report = tokio::task::spawn_blocking(move || {
                        let mut g = hearth_agent::device::nvml::NvmlGpus::open(None)?;
                        hearth_agent::device::nvml_bench::run(&mut g, rounds, pause).map_err(anyhow::Error::msg)
                    })
                    .await??;
                    print!("{report}");
                }
            }
        }
        Cmd::Cache { cmd: CacheCmd::Ls { dest, json } } => {
            hearth_agent::prefetch::ls(&dest.unwrap_or_else(hearth_agent::cache::default_root), json)?;
        }
        Cmd::SampleNet { role, addr } => {
            let r = match role.as_str() {
                "server" => hearth_agent::netobs::sample::serve(addr),
                "client" => hearth_agent::netobs::sample::client(addr),
                other => anyhow::bail!("__sample-net: expected server or client, got {other:?}"),
            };
            r.context("sample network workload")?;
        }
        Cmd::NeuronMonitorSim { sysfs, instance_type, instance_id, period } => {
            let period = hearth_service::config::parse_duration("--period", &period)?;
            tokio::task::spawn_blocking(move || hearth_agent::neuron::sim::run(&sysfs, &instance_type, &instance_id, period)).await??
        }
        Cmd::SampleServer { port, model, model_dir, model_uri, token_time, max_batch } => {
            let token_time = hearth_service::config::parse_duration("--token-time", &token_time)?;
            hearth_agent::runtime::sample_server::run(hearth_agent::runtime::sample_server::SampleArgs {
                port,
                model,
                model_dir,
                model_uri,
                token_time,
                max_batch,
            })
            .await?;
        }
        Cmd::Cache { cmd: CacheCmd::Manifest { dir } } => hearth_agent::prefetch::write_manifest(&dir)?,
        Cmd::Cache { cmd: CacheCmd::Sample { dir, shards, shard_size } } => {
            let size = hearth_service::config::parse_size("--shard-size", &shard_size)?;
            hearth_agent::cache::sample::write_sample_model(&dir, shards, size)
                .with_context(|| format!("writing a sample model to {}", dir.display()))?;
            println!("wrote {shards} shards of {size} bytes to {}", dir.display());
        }
        Cmd::Call { method, data, max_messages, max_time, conn } => {
            let max_time = max_time.map(|t| hearth_service::config::parse_duration("--max-time", &t)).transpose()?;
            let conn = conn.into_args(hearth_agent::status::Output::Json);
            hearth_agent::call::run(hearth_agent::call::CallArgs { method, data, max_messages, max_time, conn }).await?;
        }
        Cmd::Status { output, conn } => hearth_agent::status::run(conn.into_args(output)).await?,
        Cmd::Images {
            cmd:
                ImagesCmd::Pull {
                    reference,
                    containerd_socket,
                    namespace,
                    auth_file,
                    insecure_registry,
                    connections,
                    chunk_size,
                    direct_above,
                    hosts_dir,
                    no_mirror,
                    quiet,
                },
        } => {
            spawn_signal_handler(shutdown.clone());
            let chunk = hearth_service::config::parse_size("--chunk-size", &chunk_size)?;
            let args = hearth_agent::images::cli::PullArgs {
                reference,
                socket: containerd_socket,
                namespace,
                auth_file,
                insecure: insecure_registry,
                connections,
                chunk,
                direct_above: hearth_service::config::parse_size("--direct-above", &direct_above)?,
                hosts_dir: (!no_mirror).then_some(hosts_dir),
                progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            hearth_agent::images::cli::pull(args, shutdown).await?
        }
        Cmd::Images { cmd: ImagesCmd::Ls { containerd_socket, namespace, json } } => {
            hearth_agent::images::cli::ls(containerd_socket, namespace, json).await?
        }
        Cmd::Runtime { cmd: RuntimeCmd::Ls { node, output, conn } } => hearth_agent::runtime::cli::ls(conn.into_args(output), node).await?,
        Cmd::Runtime { cmd: RuntimeCmd::Logs { name, agent_state_dir, lines } } => {
            println!("{}", hearth_agent::runtime::cli::logs(&agent_state_dir, &name, lines)?)
        }
    }
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        hearth_service::telemetry::shutdown_signal().await;
        shutdown.cancel();
    });
}
