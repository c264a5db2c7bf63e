//! The running part of `hearth local`: dev CA, embedded controller, agent, live status.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use hearth_service::pki::{CertAuthority, LeafSpec, Usage, write_atomic, write_bundle};
use tokio_util::sync::CancellationToken;

use super::{LocalInfo, info_path};
use crate::config::{Config, ControllerConfig, DEFAULT_EXCLUDED_INTERFACES, DeviceBackendKind};
use crate::device::sim::SimSpec;

#[derive(Debug, Clone)]
pub struct LocalArgs {
    pub state_dir: PathBuf,
    pub node_name: String,
    pub devices: Vec<String>,
    pub controller_listen: String,
    pub controller_http_listen: String,
    pub agent_http_listen: String,
    pub extender_listen: String,
    /// 0: any free port.
    pub sample_port: u16,
    /// Most requests the sample load keeps in flight against the sample model server; 0: none.
    pub sample_load: u32,
}

pub async fn run(args: LocalArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = args.state_dir.join("local");
    let pki = dir.join("pki");
    // A start that fails leaves nothing behind that it created (certificates included).
    let mut undo = Undo(pki.ancestors().take_while(|p| !p.exists()).last().map(Path::to_owned));
    std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    let year = Duration::from_secs(365 * 86400);
    let ca = CertAuthority::new("hearth local CA")?;
    let server = ca.issue(&LeafSpec::new("hearth-controller", &["localhost", "127.0.0.1"], Usage::Server, year))?;
    let agent = ca.issue(&LeafSpec::new(&args.node_name, &[&args.node_name], Usage::Client, year))?;
    let operator = ca.issue(&LeafSpec::new("operator", &["operator"], Usage::Client, year))?;
    let server_files = write_bundle(&pki, "controller", ca.cert_pem(), &server)?;
    let agent_files = write_bundle(&pki, "agent", ca.cert_pem(), &agent)?;
    let operator_files = write_bundle(&pki, "operator", ca.cert_pem(), &operator)?;

    let mut craw = hearth_controller::config::RawConfig {
        listen: args.controller_listen.clone(),
        http_listen: args.controller_http_listen.clone(),
        ..Default::default()
    };
    // Two model deployments over the sample model: `llama-sample`, which placement and
    // scaling answer about (replicas would come from elsewhere), and `sample-chat`, which the
    // controller serves itself through the agent (a sample model server on a simulated GPU,
    // scaled on its load); the extender on a free local port.
    let sample_dir = dir.join("sample-models/llama-sample");
    let devices = args
        .devices
        .iter()
        .map(|d| SimSpec::parse(d).map_err(|e| anyhow::anyhow!("--devices: expected {e}, got {d:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // A Neuron instance type instead of GPUs: the sample deployments take a core group (one
    // device's cores), and a partition spec makes one group per device.
    let neuron = devices.iter().find_map(|d| d.instance).filter(|_| devices.iter().all(|d| d.instance.is_some()));
    let resources = match neuron {
        Some(t) => format!("{{neuron_cores: {}, memory: 1Gi}}", t.cores_per_device),
        None => "{gpus: 1, memory: 1Gi}".to_owned(),
    };
    craw.models = serde_yaml_ng::from_str(&format!(
        "- {{name: llama-sample, source: \"file://{d}\", size: 256Mi, image: vllm/vllm-openai:latest, image_size: 8Gi, resources: {resources}, scaling: {{min_replicas: 0, max_replicas: 2}}}}\n\
         - {{name: {SAMPLE_CHAT}, source: \"file://{d}\", size: 256Mi, image: hearth-sample, resources: {resources}, managed_by: agent,\n   \
            scaling: {{min_replicas: 1, max_replicas: 2, target_concurrency: 4, stable_window: 20s, panic_window: 4s, scale_down_delay: 30s}}}}",
        d = sample_dir.display()
    ))?;
    craw.extender.listen = args.extender_listen.clone();
    craw.tls.ca = Some(server_files.ca.clone());
    craw.tls.cert = Some(server_files.cert);
    craw.tls.key = Some(server_files.key);
    let ccfg = hearth_controller::Config::try_from(craw)?;
    let controller = hearth_controller::start(ccfg, shutdown.clone()).await?;
    let controller_url = format!("https://{}", controller.grpc_addr);

    // An FSx-style source to prefetch from: a sample model on local disk, written once.
    if !sample_dir.join(crate::cache::verify::MANIFEST_NAME).exists() {
        println!("writing a sample model (4 x 64 MiB safetensors shards) to {} ...", sample_dir.display());
        let d = sample_dir.clone();
        tokio::task::spawn_blocking(move || {
            crate::cache::sample::write_sample_model(&d, 4, 64 << 20)?;
            let m = crate::cache::verify::Manifest::build(&d).map_err(std::io::Error::other)?;
            hearth_service::fsutil::write_atomic(&d.join(crate::cache::verify::MANIFEST_NAME), m.to_json().as_bytes(), false)
        })
        .await??;
    }
    // The sample model servers' ports: the first free one and the next (two replicas at most).
    let sample_base_port = free_port_pair()?;
    let sample_spec = crate::cache::spec::ModelSpec::new(&format!("file://{}", sample_dir.display()), &[], &[], "")?;
    // Per-pod network metrics need root (BPF, cgroups): then a sample workload runs in two
    // stand-in pods under a cgroup made for it; otherwise the metrics say why they are off.
    let (sample, network_off) = if rustix::process::geteuid().is_root() {
        match crate::netobs::sample::SampleWorkload::start(args.sample_port) {
            Ok(w) => (Some(w), None),
            Err(e) => (None, Some(format!("the sample workload did not start: {e}"))),
        }
    } else {
        (None, Some("not root: per-pod network metrics need BPF and cgroups (run hearth local as root)".to_owned()))
    };
    if let Some(why) = &network_off {
        println!("network metrics: off ({why})");
    }
    let network = crate::config::NetworkSettings {
        enabled: sample.is_some(),
        cgroup_root: sample.as_ref().map(|w| w.root().to_owned()),
        collect_interval: Duration::from_secs(2),
        forget_after: Duration::from_secs(60),
        ports: sample.as_ref().map(|w| vec![w.port]).unwrap_or_default(),
        peers: vec![crate::netobs::PeerClass::parse("loopback", &["127.0.0.0/8", "::1"])?],
        bpf_stats: true,
        static_pods: sample.as_ref().map(|w| w.pods.clone()).unwrap_or_default(),
        off_reason: network_off,
    };
    let acfg = Config {
        node_name: args.node_name.clone(),
        controller: Some(ControllerConfig {
            url: controller_url.clone(),
            server_name: "localhost".into(),
            tls: Some(agent_files),
            heartbeat_interval: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }),
        http_listen: args.agent_http_listen.parse().map_err(|_| {
            anyhow::anyhow!("--agent-http-listen: expected an address like 127.0.0.1:7072, got {:?}", args.agent_http_listen)
        })?,
        devices: DeviceBackendKind::Simulated(devices),
        gpu: crate::config::GpuSettings {
            collect_interval: Duration::from_secs(2),
            host_label: crate::gpu_metrics::render::HostLabel::new("Hostname", &args.node_name),
            nvml_library: None,
            // No kubelet here: GPU metrics carry no pod labels (and count the missing socket).
            pod_resources: crate::kube::podres::PodResSettings {
                dir: dir.join("pod-resources"),
                every: Duration::from_secs(30),
                timeout: Duration::from_secs(2),
                stale_after: Duration::from_secs(90),
            },
        },
        procfs_root: "/proc".into(),
        collect_interval: Duration::from_secs(2),
        exclude_interfaces: DEFAULT_EXCLUDED_INTERFACES.iter().map(|s| (*s).to_owned()).collect(),
        labels: [("hearth.dev/mode".to_owned(), "local".to_owned())].into(),
        cache: crate::config::CacheSettings {
            config: crate::cache::manager::CacheConfig {
                root: dir.join("cache"),
                capacity: None,
                high_watermark: 0.95,
                low_watermark: 0.90,
                fetch: Default::default(),
                s3: Default::default(),
            },
            models: vec![(sample_spec.clone(), true)],
        },
        shutdown_grace: Duration::from_secs(5),
        max_message_bytes: hearth_proto::transport::DEFAULT_MAX_MESSAGE_BYTES,
        partition: neuron.map(|t| {
            (
                format!(
                    "version: v1\nneuron-configs:\n  local:\n    - devices: all\n      core-groups: [{{cores: {}, count: {}}}]\n",
                    t.cores_per_device, t.devices
                ),
                "local".to_owned(),
            )
        }),
        state_dir: dir.join("state"),
        kubernetes: None,
        network,
        // The controller's StartRuntime for sample-chat runs `hearth sample-server` (this
        // binary) on the cached sample model, bound to the GPU placement chose.
        runtimes: crate::runtime::RuntimeSettings {
            discovery_label: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            engines: [(crate::runtime::engine::Kind::Vllm, sample_template(sample_base_port)?)].into(),
            ..Default::default()
        },
        // Local mode never touches a containerd that may run on the machine.
        images: crate::images::ImageSettings { enabled: Some(false), ..Default::default() },
        // Neuron devices in --devices (an instance type) get the simulated driver and monitor.
        neuron: Default::default(),
    };

    let agent = crate::daemon::start(acfg, shutdown.clone()).await?;
    undo.0 = None;
    if args.sample_load > 0 {
        tokio::spawn(sample_load(sample_base_port, args.sample_load, shutdown.clone()));
    }

    let info = LocalInfo {
        pid: std::process::id(),
        controller_url: controller_url.clone(),
        server_name: "localhost".into(),
        ca: operator_files.ca,
        cert: operator_files.cert,
        key: operator_files.key,
        controller_metrics: format!("http://{}/metrics", controller.http_addr),
        agent_metrics: format!("http://{}/metrics", agent.http_addr),
        node_name: args.node_name.clone(),
        extender_url: controller.extender_addr.map(|a| format!("https://localhost:{}/extender", a.port())),
    };
    let info_file = info_path(&args.state_dir);
    write_atomic(&info_file, serde_json::to_string_pretty(&info)?.as_bytes(), false)?;

    println!("Hearth local mode: a controller and one agent with simulated accelerators, over mTLS");
    println!("  controller gRPC     {controller_url}");
    println!("  controller metrics  {}", info.controller_metrics);
    println!("  agent metrics       {}", info.agent_metrics);
    println!("  state and certs     {}", dir.display());
    // The exact command: `hearth status` alone finds only the default state directory.
    let status = if args.state_dir == super::default_state_dir() {
        "hearth status".to_owned()
    } else {
        format!("hearth status --state-dir {}", args.state_dir.display())
    };
    println!("  in another terminal: {status}   (or: {status} --output json)");
    if let Some(a) = controller.extender_addr {
        println!("  scheduler extender  https://localhost:{}/extender", a.port());
    }
    if let Some(w) = &sample {
        println!("  sample workload     127.0.0.1:{} (two stand-in pods in namespace {:?})", w.port, crate::netobs::sample::NAMESPACE);
    }
    if let Some(url) = &info.extender_url {
        println!("  placement (scheduler extender, operator cert):");
        println!(
            "    curl -s --cacert {ca} --cert {cert} --key {key} {url}/prioritize -d '{{\"Pod\":{{\"metadata\":{{\"annotations\":{{\"hearth.dev/model\":\"llama-sample\"}}}}}},\"NodeNames\":[\"{node}\"]}}'",
            ca = info.ca.display(),
            cert = info.cert.display(),
            key = info.key.display(),
            node = args.node_name
        );
    }
    println!("  Ctrl-C stops everything.");

    let live = live_status(controller.state.clone(), controller.scaling.clone(), shutdown.clone());
    if sample.is_some() {
        println!("  network metrics     curl -s {} | grep hearth_pod_network_", info.agent_metrics);
    }
    let (c, a, ()) = tokio::join!(controller.wait(), agent.wait(), live);
    drop(sample);
    let _ = std::fs::remove_file(&info_file);
    c?;
    a?;
    println!("stopped");
    Ok(())
}

/// The controller-served sample deployment.
pub const SAMPLE_CHAT: &str = "sample-chat";

/// Two free consecutive ports (the sample servers take the first, then the next).
fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0")?;
        let p = a.local_addr()?.port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    anyhow::bail!("no two free consecutive ports on 127.0.0.1")
}

/// How the agent starts the sample model server: this binary's `sample-server`.
fn sample_template(port: u16) -> anyhow::Result<crate::runtime::commands::EngineTemplate> {
    let exe = std::env::current_exe().context("finding the hearth binary for the sample model server")?;
    Ok(crate::runtime::commands::EngineTemplate {
        command: vec![
            exe.display().to_string(),
            "sample-server".into(),
            "--port".into(),
            "{port}".into(),
            "--model".into(),
            SAMPLE_CHAT.into(),
            "--model-dir".into(),
            "{model_dir}".into(),
        ],
        port,
        ready_timeout: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(3),
        image: None,
    })
}

/// Keeps a number of completions in flight against the sample servers that answer, rising
/// and falling between 0 and `max` over two minutes, so their load moves the scaler.
async fn sample_load(base: u16, max: u32, stop: CancellationToken) {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t0 = Instant::now();
    let mut next = 0u16;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let phase = t0.elapsed().as_secs_f64() / 120.0 * std::f64::consts::TAU;
        let want = (f64::from(max) * (0.5 - 0.5 * phase.cos())).round() as u32;
        while in_flight.load(std::sync::atomic::Ordering::Relaxed) < want {
            in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = base + next % 2;
            next = next.wrapping_add(1);
            let (client, n) = (client.clone(), in_flight.clone());
            tokio::spawn(async move {
                let body = r#"{"prompt": "why keep the weights warm", "max_tokens": 48}"#;
                let req = hyper::Request::post(format!("http://127.0.0.1:{port}/v1/completions"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())));
                if let Ok(req) = req
                    && let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(30), client.request(req)).await
                {
                    let _ = resp.into_body().collect().await;
                } else {
                    // No server there (yet): do not spin.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                n.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
    }
}

/// Removes a directory this run created, unless the run got far enough to keep it.
struct Undo(Option<PathBuf>);

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Prints the cluster view: a line rewritten in place on a terminal, a new line on each
/// change otherwise (so logs and CI output stay readable).
async fn live_status(
    state: std::sync::Arc<hearth_controller::state::ClusterState>,
    scaling: std::sync::Arc<hearth_controller::scaling::Scaling>,
    shutdown: CancellationToken,
) {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let lines = state.list(Instant::now(), |v, s| {
            let accel = match s.accelerators.first() {
                Some(a) => format!("{} x {}", s.accelerators.len(), a.product),
                None => "no accelerators reported yet".to_owned(),
            };
            let models: Vec<String> = s
                .models
                .iter()
                .map(|m| {
                    let state = hearth_proto::v1::CacheEntryState::try_from(m.state).map_or("?", |s| s.as_str_name());
                    let pct = (100 * m.bytes_present).checked_div(m.bytes_total).unwrap_or(0);
                    format!("{} {} {pct}%", m.id, state.trim_start_matches("CACHE_ENTRY_STATE_").to_ascii_lowercase())
                })
                .collect();
            let models = if models.is_empty() { "no models".to_owned() } else { models.join(", ") };
            let runtimes: Vec<String> = s
                .runtimes
                .iter()
                .map(|r| {
                    let l = r.load.unwrap_or_default();
                    format!("{} {} ({:.0} running, {:.0} waiting)", r.name, r.state, l.requests_running, l.requests_waiting)
                })
                .collect();
            let runtimes = if runtimes.is_empty() { String::new() } else { format!(", runtimes: {}", runtimes.join(", ")) };
            format!(
                "node {}: {}, {accel}, {models}{runtimes}, last report {:.1}s ago",
                v.name,
                v.connection.as_str(),
                v.last_report_age.as_secs_f64()
            )
        });
        let decisions: Vec<String> = scaling
            .decisions(Some(SAMPLE_CHAT))
            .unwrap_or_default()
            .iter()
            .map(|d| format!("{}: desired {} ({})", d.model, d.recommendation.desired, d.recommendation.reason.as_str()))
            .collect();
        let mut line = if lines.is_empty() { "waiting for the agent to connect...".to_owned() } else { lines.join("; ") };
        if !decisions.is_empty() {
            line = format!("{line}; {}", decisions.join(", "));
        }
        let mut out = std::io::stdout().lock();
        if tty {
            let _ = write!(out, "\r\x1b[2K{line}");
            let _ = out.flush();
        } else {
            // Ignore the age and the load when deciding whether anything changed.
            let key: String =
                line.split(", last report").next().unwrap_or("").split(" (").map(|p| p.split(')').next_back().unwrap_or("")).collect();
            if key != last {
                let _ = writeln!(out, "{line}");
                last = key;
            }
        }
    }
    if tty {
        println!();
    }
}
