//! Helpers for Hearth's end-to-end tests and benchmarks: a test PKI, real `hearth` /
//! `hearth-controller` / Prometheus processes in temp dirs (stopped by PID, killed on
//! drop), a raw protocol client, and polling with deadlines instead of sleeps.
//!
//! Servers bind port 0 and report the address they got: in-process ones return it, child
//! processes log it and [`Proc::wait_for_log_line`] reads it back. No helper probes for a
//! free port and releases it for someone else to bind: another test could take it between
//! the probe and the bind.

pub mod apiserver;
pub mod containerd;
pub mod faultproxy;
pub mod registry;
pub mod regproxy;
pub mod relay;
pub mod seaweed;
pub mod sim;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hearth_proto::transport::TlsMaterial;
use hearth_proto::v1 as pb;
use hearth_service::pki::{CertAuthority, Issued, LeafSpec, Usage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A workspace binary, built next to the test executable (`cargo build --workspace` or the
/// test script builds them). Fails loudly when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Tests run from target/<profile>/deps/, benchmark binaries from target/<profile>/.
    let mut dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let p = dir.join(name);
    assert!(p.exists(), "binary {} not found; build it first with `cargo build --workspace --bins` (the test script does)", p.display());
    p
}

/// Polls `f` until it returns Ok(Some(v)) or the deadline passes; the last error or
/// `what` explains a timeout.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CA and files for the certificates a test needs.
pub struct TestPki {
    pub ca: CertAuthority,
    pub dir: PathBuf,
}

impl TestPki {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca = CertAuthority::new("hearth test CA")?;
        std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
        Ok(Self { ca, dir: dir.to_owned() })
    }

    fn write(&self, name: &str, issued: &Issued) -> Result<hearth_proto::transport::TlsFiles> {
        Ok(hearth_service::pki::write_bundle(&self.dir, name, self.ca.cert_pem(), issued)?)
    }

    pub fn server(&self) -> Result<hearth_proto::transport::TlsFiles> {
        let i = self.ca.issue(&LeafSpec::new("controller", &["localhost", "127.0.0.1"], Usage::Server, Duration::from_secs(86400)))?;
        self.write("controller", &i)
    }

    /// A client certificate whose DNS SAN is `name` (a node name, or "operator").
    pub fn client(&self, name: &str) -> Result<hearth_proto::transport::TlsFiles> {
        let i = self.ca.issue(&LeafSpec::new(name, &[name], Usage::Client, Duration::from_secs(86400)))?;
        self.write(&format!("client-{name}"), &i)
    }

    pub fn client_material(&self, name: &str) -> Result<TlsMaterial> {
        let i = self.ca.issue(&LeafSpec::new(name, &[name], Usage::Client, Duration::from_secs(86400)))?;
        Ok(TlsMaterial::from_pem(self.ca.cert_pem().into(), i.cert_pem.into_bytes(), i.key_pem.into_bytes())?)
    }

    pub fn expired_client_material(&self, name: &str) -> Result<TlsMaterial> {
        let spec = LeafSpec::new(name, &[name], Usage::Client, Duration::from_secs(86400)).expired(Duration::from_secs(3600));
        let i = self.ca.issue(&spec)?;
        Ok(TlsMaterial::from_pem(self.ca.cert_pem().into(), i.cert_pem.into_bytes(), i.key_pem.into_bytes())?)
    }

    /// A client certificate from a different CA, trusting our CA for the server.
    pub fn foreign_client_material(&self, name: &str) -> Result<TlsMaterial> {
        let other = CertAuthority::new("someone else's CA")?;
        let i = other.issue(&LeafSpec::new(name, &[name], Usage::Client, Duration::from_secs(86400)))?;
        Ok(TlsMaterial::from_pem(self.ca.cert_pem().into(), i.cert_pem.into_bytes(), i.key_pem.into_bytes())?)
    }

    pub fn ca_only(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(self.ca.cert_pem()))
            .domain_name("localhost")
    }
}

/// A child process with its output in a log file; SIGKILLed on drop so a failing test
/// leaves nothing behind.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// Where this process's output starts in `log` (a restarted process appends to the log
    /// of the one before it).
    log_start: usize,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let log_start = usize::try_from(out.metadata()?.len())?;
        let child =
            cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self { name: name.into(), child, log, log_start })
    }

    /// Waits for the first line of this process's output that contains `needle`: how a test
    /// learns what a child bound to port 0 got. Fails with the log when the process exits
    /// first or `timeout` passes.
    pub async fn wait_for_log_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            // Read before checking for exit, so a line written just before exiting is seen.
            let text = self.own_log_text();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("{} exited ({st}) before logging {needle:?}:\n{text}", self.name);
            }
            if start.elapsed() > timeout {
                bail!("{} did not log {needle:?} within {timeout:?}:\n{text}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This process's output, without that of earlier processes sharing its log file.
    pub fn own_log_text(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(all.get(self.log_start..).unwrap_or_default()).into_owned()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status()?;
        if !st.success() {
            bail!("kill -{sig} {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits for exit up to `timeout`; None if still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(Some(st));
            }
            if start.elapsed() > timeout {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=value` in a log line (tracing's text format, or logfmt): up to the
/// next space, quotes removed.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.match_indices(&format!("{key}=")).find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')?.0;
    let value = line[at + key.len() + 1..].split(' ').next()?;
    Some(value.trim_matches('"'))
}

/// The address a child process logged under `key` in `line`.
pub fn logged_addr(line: &str, key: &str) -> Result<SocketAddr> {
    let v = log_field(line, key).ok_or_else(|| anyhow!("no {key}= in log line {line:?}"))?;
    v.parse().with_context(|| format!("{key}={v:?} in log line {line:?}: expected an address"))
}

/// Starts `hearth-controller run` with mTLS from `pki`, every listener on port 0; the
/// addresses come from its "controller listening" log line.
pub struct ControllerProc {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl ControllerProc {
    pub async fn start(dir: &Path, pki: &TestPki, extra_yaml: &str) -> Result<Self> {
        Self::start_with_env(dir, pki, extra_yaml, &[]).await
    }

    /// Like `start`, with environment variables (the downward API's POD_NAME and
    /// POD_NAMESPACE, for leader election).
    pub async fn start_with_env(dir: &Path, pki: &TestPki, extra_yaml: &str, env: &[(&str, &str)]) -> Result<Self> {
        let files = pki.server()?;
        let cfg = dir.join("controller.yaml");
        std::fs::write(
            &cfg,
            format!(
                "listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\nextender: {{listen: \"127.0.0.1:0\"}}\ntls: {{ca: {}, cert: {}, key: {}}}\n{extra_yaml}",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            ),
        )?;
        let mut cmd = Command::new(bin("hearth-controller"));
        cmd.args(["run", "--config"]).arg(&cfg).env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn("controller", &mut cmd, dir)?;
        let line = proc.wait_for_log_line("controller listening", Duration::from_secs(15)).await?;
        let c = Self { proc, grpc: logged_addr(&line, "grpc_addr")?, http: logged_addr(&line, "http_addr")? };
        wait_for("controller /healthz", Duration::from_secs(15), || async {
            Ok(http_get(c.http, "/healthz").await.ok().filter(|(s, _)| *s == 200).map(|_| ()))
        })
        .await
        .with_context(|| c.proc.log_text())?;
        Ok(c)
    }
}

/// The `devices:` section [`AgentProc::start`] gives agents: two simulated H100s, sampled often.
pub const SIMULATED_DEVICES: &str = "{simulated: [2xH100-80GB], collect_interval: 300ms}";

/// Starts `hearth agent` with simulated devices, reporting to `controller`; its HTTP
/// listener is on port 0, the address from its "agent serving" log line.
pub struct AgentProc {
    pub proc: Proc,
    pub http: SocketAddr,
}

impl AgentProc {
    /// `extra_yaml` is appended at the top level of the agent's config.
    pub async fn start(dir: &Path, pki: &TestPki, node: &str, controller: SocketAddr, extra_yaml: &str) -> Result<Self> {
        Self::spawn(dir, pki, node, controller, extra_yaml, "").await
    }

    /// Like `start`, with `cache_extra` appended inside the `cache:` mapping (indented keys).
    pub async fn start_with_cache_models(dir: &Path, pki: &TestPki, node: &str, controller: SocketAddr, cache_extra: &str) -> Result<Self> {
        Self::spawn(dir, pki, node, controller, "", cache_extra).await
    }

    /// Like `start`, with `devices_yaml` (a flow mapping) as the `devices:` section.
    pub async fn start_with_devices(dir: &Path, pki: &TestPki, node: &str, controller: SocketAddr, devices_yaml: &str) -> Result<Self> {
        Self::spawn_with(dir, pki, node, controller, "", "", devices_yaml, &[]).await
    }

    async fn spawn(dir: &Path, pki: &TestPki, node: &str, controller: SocketAddr, extra_yaml: &str, cache_extra: &str) -> Result<Self> {
        Self::spawn_with(dir, pki, node, controller, extra_yaml, cache_extra, SIMULATED_DEVICES, &[]).await
    }

    /// The general form: `extra_yaml` at the top level, `cache_extra` inside `cache:`,
    /// `devices` (a flow mapping) as `devices:`, and `env` for the process.
    #[allow(clippy::too_many_arguments)]
    pub async fn spawn_with(
        dir: &Path,
        pki: &TestPki,
        node: &str,
        controller: SocketAddr,
        extra_yaml: &str,
        cache_extra: &str,
        devices: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let files = pki.client(node)?;
        let cache = dir.join(format!("cache-{node}"));
        std::fs::create_dir_all(&cache)?;
        let cfg = dir.join(format!("agent-{node}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "node_name: {node}\nhttp_listen: 127.0.0.1:0\n\
                 controller:\n  url: https://{controller}\n  server_name: localhost\n  heartbeat_interval: 500ms\n  \
                 backoff_initial: 100ms\n  backoff_max: 1s\n  tls: {{ca: {}, cert: {}, key: {}}}\n\
                 devices: {devices}\nnode: {{collect_interval: 300ms}}\nstate_dir: {}\ncache:\n  root: {}\n{cache_extra}{extra_yaml}",
                files.ca.display(),
                files.cert.display(),
                files.key.display(),
                dir.join(format!("state-{node}")).display(),
                cache.display()
            ),
        )?;
        let mut proc = Proc::spawn(
            &format!("agent-{node}"),
            Command::new(bin("hearth")).args(["agent", "--config"]).arg(&cfg).env("RUST_LOG", "info").envs(env.iter().copied()),
            dir,
        )?;
        let line = proc.wait_for_log_line("agent serving /metrics", Duration::from_secs(20)).await?;
        let http = logged_addr(&line, "http_addr")?;
        Ok(Self { proc, http })
    }
}

/// A node's state as the controller's Operator API shows it (None: not known yet).
pub async fn node_state(ctl: &hearth_controller::Running, pki: &TestPki, node: &str) -> Result<Option<pb::NodeState>> {
    let ch = channel(ctl.grpc_addr, Some(&pki.client_material("operator")?)).await?;
    match pb::operator_client::OperatorClient::new(ch).get_node(pb::GetNodeRequest { name: node.into() }).await {
        Ok(r) => Ok(r.into_inner().state),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s.into()),
    }
}

/// Queues a command for `node` on an in-process controller's stream, its id doubling as the
/// idempotency key.
pub fn send_command(ctl: &hearth_controller::Running, node: &str, id: &str, kind: pb::command::Kind) -> Result<()> {
    Ok(ctl.state.send_command(node, pb::Command { id: id.into(), idempotency_key: id.into(), deadline: None, kind: Some(kind) })?)
}

/// A test's agent stops as in production when the test ends: SIGTERM, so it drains the
/// servers it runs as processes (they outlive a SIGKILL by design, to be adopted), then the
/// process's own SIGKILL if it has not exited within its grace.
impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.proc.child.try_wait().ok().flatten().is_some() || self.proc.signal("TERM").is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.proc.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a command, failing with its stderr when it fails.
pub fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A minimal HTTP/1.1 GET (the endpoints under test are ours; no client crate needed).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_get_with(addr, path, &[]).await
}

pub async fn http_get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line {head:?}"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

/// One HTTPS POST to a server our test CA signed (name "localhost"), with an optional client
/// certificate and extra headers; the response status and body.
pub async fn https_post(
    addr: SocketAddr,
    path: &str,
    body: &str,
    client: Option<&TlsMaterial>,
    headers: &[(&str, &str)],
    ca_pem: &str,
) -> Result<(u16, String)> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?.with_root_certificates(roots);
    let cfg = match client {
        Some(t) => b.with_client_auth_cert(t.cert_chain()?, t.private_key()?)?,
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    // A server that closes without close_notify is fine here: we have what it sent.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line {head:?}"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of one sample in Prometheus text (`name{labels} value`), if present.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// A tonic channel to the controller with the given client identity.
pub async fn channel(addr: SocketAddr, tls: Option<&TlsMaterial>) -> Result<tonic::transport::Channel> {
    let mut ep = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?.connect_timeout(Duration::from_secs(5));
    if let Some(t) = tls {
        ep = ep.tls_config(t.client_config("localhost"))?;
    }
    Ok(ep.connect().await?)
}

pub async fn list_nodes(addr: SocketAddr, tls: &TlsMaterial) -> Result<Vec<pb::NodeSummary>> {
    let ch = channel(addr, Some(tls)).await?;
    Ok(pb::operator_client::OperatorClient::new(ch).list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes)
}

pub fn hello(node: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_name: node.into(),
            boot_id: "test-boot".into(),
            agent_version: "test".into(),
            api_version: hearth_proto::API_VERSION,
            capabilities: vec![],
            heartbeat_interval_ms: 1000,
        })),
    }
}

/// A hand-driven agent stream: send what you like, read what comes back.
pub struct RawAgent {
    pub tx: mpsc::Sender<pb::AgentMessage>,
    pub rx: tonic::Streaming<pb::ControllerMessage>,
}

impl RawAgent {
    /// Opens a stream, sends Hello and waits for the controller's answer to it.
    pub async fn connect(ch: tonic::transport::Channel, node: &str) -> std::result::Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        tx.send(hello(node)).await.map_err(|_| tonic::Status::internal("queue"))?;
        let mut client = pb::node_agent_client::NodeAgentClient::new(ch);
        let mut rx = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        match rx.message().await? {
            Some(pb::ControllerMessage { kind: Some(pb::controller_message::Kind::Ack(_)) }) => Ok(Self { tx, rx }),
            other => Err(tonic::Status::internal(format!("expected Ack of Hello, got {other:?}"))),
        }
    }

    pub async fn send(&self, kind: pb::agent_message::Kind) -> Result<()> {
        self.tx.send(pb::AgentMessage { kind: Some(kind) }).await.map_err(|_| anyhow!("stream closed"))
    }

    /// The next message, or an error if the stream ended or 5 s passed.
    pub async fn next(&mut self) -> std::result::Result<pb::ControllerMessage, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(5), self.rx.message()).await {
            Err(_) => Err(tonic::Status::deadline_exceeded("no message within 5s")),
            Ok(r) => r?.ok_or_else(|| tonic::Status::cancelled("stream ended")),
        }
    }
}

/// Starts an in-process controller with mTLS, every listener on port 0 (the bound addresses
/// are in the returned `Running`).
pub async fn start_controller(
    pki: &TestPki,
    shutdown: tokio_util::sync::CancellationToken,
    tweak: impl FnOnce(&mut hearth_controller::config::RawConfig),
) -> Result<hearth_controller::Running> {
    let files = pki.server()?;
    let mut raw =
        hearth_controller::config::RawConfig { listen: "127.0.0.1:0".into(), http_listen: "127.0.0.1:0".into(), ..Default::default() };
    raw.extender.listen = "127.0.0.1:0".into();
    raw.tls.ca = Some(files.ca);
    raw.tls.cert = Some(files.cert);
    raw.tls.key = Some(files.key);
    tweak(&mut raw);
    Ok(hearth_controller::start(hearth_controller::Config::try_from(raw)?, shutdown).await?)
}

/// Whether a tool is on PATH (for tests that fail with install advice when it is not).
pub fn require_tool(name: &str, install: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{name}` is not installed; this test needs it ({install}). scripts/test.sh installs it."))
}

/// The API test server with `node` registered, allowing the agent's RBAC rules; returns
/// it and the agent's `kubernetes:` config line (a kubeconfig in `dir`).
pub async fn agent_api_server(dir: &std::path::Path, node: &str) -> Result<(apiserver::ApiServer, String)> {
    let s = apiserver::ApiServer::start(&[hearth_agent::kube::API_RULES, hearth_agent::kube::POD_DRIVER_RULES]).await?;
    s.add_node(node);
    let kc = s.kubeconfig(dir)?;
    Ok((s, format!("kubernetes: {{kubeconfig: {}}}\n", kc.display())))
}

/// `hearth local` with its state in `state` and every listener on a free port (the sample
/// workload on `sample_port`, "0" for a free one; the sample load keeping at most
/// `sample_load` requests in flight, "0" for none): each test reads what it bound from
/// `local.json` or the banner.
pub fn local_mode(state: &Path, sample_port: &str, sample_load: &str) -> Command {
    let mut c = Command::new(bin("hearth"));
    c.arg("local").arg("--state-dir").arg(state);
    for flag in ["--controller-listen", "--controller-http-listen", "--agent-http-listen", "--extender-listen"] {
        c.args([flag, "127.0.0.1:0"]);
    }
    c.args(["--sample-port", sample_port, "--sample-load", sample_load]);
    c
}
