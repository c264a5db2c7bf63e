//! StartRuntime to ready: the same engine (`hearth sample-server`) started by the agent on a
//! model Hearth has cached, against the same engine loading the same weights itself from the
//! S3 source, alternating in one run. The source is SeaweedFS on loopback; the controller
//! sends StartRuntime (and StopRuntime after each) to a real agent process, and ready is
//! the controller seeing the runtime ready in the agent's report (read every 100 ms).
//!
//!   cargo run --release -p hearth-tests --bin bench-runtime-start -- --shards 4 --shard-size 256Mi
//!
//! The engine reads each object in sequential 16 MiB requests on one stream (what an
//! engine's own loader does) through a proxy that caps each connection at `--per-connection`
//! bytes/s, as object storage does (S3 serves one connection at roughly 85-90 MB/s); the
//! cached start reads the local files. Neither does any inference: what differs is only
//! where the weights come from.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hearth_proto::v1 as pb;
use hearth_tests::seaweed::SeaweedFs;
use hearth_tests::{AgentProc, TestPki, bin, start_controller, wait_for};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 4)]
    shards: u32,
    #[arg(long, default_value = "64Mi")]
    shard_size: String,
    /// Start pairs (cached, from S3), alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Bytes/s each connection to the store gets (0: no cap).
    #[arg(long, default_value = "90M")]
    per_connection: String,
}

/// A TCP proxy to `upstream` that paces what each connection receives to `rate` bytes/s.
async fn capped_proxy(upstream: std::net::SocketAddr, rate: u64) -> Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                // Paced chunk by chunk; time the connection sat idle earns no credit (a
                // kept-alive connection is no faster on its next request).
                // The timer ticks in milliseconds: sleep only once ahead by a few of them.
                let (mut free_at, mut buf) = (Instant::now(), vec![0u8; 256 << 10]);
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if rate > 0 {
                        free_at = free_at.max(Instant::now()) + Duration::from_secs_f64(n as f64 / rate as f64);
                        if free_at.saturating_duration_since(Instant::now()) > Duration::from_millis(3) {
                            tokio::time::sleep_until(free_at.into()).await;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

const NODE: &str = "bench-start";

/// StartRuntime, then the seconds until the controller sees it ready; then StopRuntime and
/// the wait until it is gone from the report.
async fn start_to_ready(state: &hearth_controller::state::ClusterState, name: &str, kind: &str, model_id: &str) -> Result<f64> {
    let send = |id: String, kind: pb::command::Kind| {
        state.send_command(NODE, pb::Command { id: id.clone(), idempotency_key: id, deadline: None, kind: Some(kind) })
    };
    let find = || async {
        let s = state.get(NODE, Instant::now()).map(|(_, s)| s);
        anyhow::Ok(s.and_then(|s| s.runtimes.into_iter().find(|r| r.name == name)))
    };
    let t0 = Instant::now();
    let start = pb::StartRuntimeCommand { name: name.into(), kind: kind.into(), model_id: model_id.into(), ..Default::default() };
    send(format!("start-{name}"), pb::command::Kind::StartRuntime(start))?;
    wait_for(&format!("{name} ready"), Duration::from_secs(600), || async { Ok(find().await?.filter(|r| r.state == "ready")) }).await?;
    let took = t0.elapsed().as_secs_f64();
    send(format!("stop-{name}"), pb::command::Kind::StopRuntime(pb::StopRuntimeCommand { name: name.into() }))?;
    wait_for(&format!("{name} gone"), Duration::from_secs(30), || async { Ok(find().await?.is_none().then_some(())) }).await?;
    Ok(took)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let shard = hearth_service::config::parse_size("--shard-size", &args.shard_size)?;
    let rate = hearth_service::config::parse_size("--per-connection", &args.per_connection)?;
    let dir = tempfile::tempdir()?;
    let s3 = SeaweedFs::start().await?;
    s3.create_bucket("models").await?;
    let src = dir.path().join("src");
    hearth_agent::cache::sample::write_sample_model(&src, args.shards, shard)?;
    let mut total = 0u64;
    for e in std::fs::read_dir(&src)? {
        let p = e?.path();
        total += std::fs::metadata(&p)?.len();
        let key = format!("m/{}", p.file_name().context("name")?.to_string_lossy());
        s3.put_file("models", &key, &p).await?;
    }
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let ctl = start_controller(&pki, stop, |_| {}).await?;
    let hearth = bin("hearth");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let serve = |extra: &str| format!("[\"{}\", sample-server, --port, \"{{port}}\", --model, m, {extra}]", hearth.display());
    // vllm: the weights Hearth cached; sglang (the same server): the weights from S3 itself.
    let extra = format!(
        "runtimes:\n  interval: 100ms\n  engines:\n    vllm: {{port: {port}, drain_timeout: 3s, command: {}}}\n    sglang: {{port: {}, drain_timeout: 3s, command: {}}}\n",
        serve("--model-dir, \"{model_dir}\""),
        port + 100,
        serve("--model-uri, \"s3://models/m/\""),
    );
    let cache_extra = format!("  s3: {{endpoint: \"{}\", force_path_style: true}}\n", s3.endpoint());
    // The agent's own cache goes to the store directly (its prefetch is not timed); the
    // engine, which inherits the environment, through the capped proxy.
    let upstream: std::net::SocketAddr = s3.endpoint().trim_start_matches("http://").parse()?;
    let proxy = format!("http://{}", capped_proxy(upstream, rate).await?);
    let env = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", &proxy),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, *v)).collect();
    let agent =
        AgentProc::spawn_with(dir.path(), &pki, NODE, ctl.grpc_addr, &extra, &cache_extra, hearth_tests::SIMULATED_DEVICES, &env).await?;
    let send = |id: String, kind: pb::command::Kind| {
        ctl.state.send_command(NODE, pb::Command { id: id.clone(), idempotency_key: id, deadline: None, kind: Some(kind) })
    };
    // The model cached once, before any timing (a prefetch through the controller).
    let uri = "s3://models/m/".to_owned();
    wait_for("the agent connected", Duration::from_secs(20), || async {
        Ok(send("p0".into(), pb::command::Kind::Prefetch(pb::PrefetchCommand { source_uri: uri.clone(), ..Default::default() })).ok())
    })
    .await?;
    let id = wait_for("the model cached", Duration::from_secs(300), || async {
        let s = ctl.state.get(NODE, Instant::now()).map(|(_, s)| s);
        Ok(s.and_then(|s| s.models.into_iter().find(|m| m.state == pb::CacheEntryState::Ready as i32)).map(|m| m.id))
    })
    .await
    .with_context(|| agent.proc.log_text())?;

    // One untimed start of each first: the binary and the files into the page cache, the
    // connection pools warm.
    for (kind, name) in [("vllm", "warm-c"), ("sglang", "warm-s")] {
        start_to_ready(&ctl.state, name, kind, &id).await.with_context(|| agent.proc.log_text())?;
    }
    println!(
        "model: {} files, {:.0} MiB; SeaweedFS on loopback, {} bytes/s per connection for the engine; {} rounds",
        args.shards,
        total as f64 / (1u64 << 20) as f64,
        if rate == 0 { "uncapped".to_owned() } else { rate.to_string() },
        args.rounds
    );
    println!("{:>5}  {:>12}  {:>12}", "round", "cached (s)", "from S3 (s)");
    let (mut cached, mut remote) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let mut times = [0.0; 2];
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let (kind, name) = if which == 0 { ("vllm", format!("c{round}")) } else { ("sglang", format!("s{round}")) };
            times[which] = start_to_ready(&ctl.state, &name, kind, &id).await.with_context(|| agent.proc.log_text())?;
        }
        println!("{round:>5}  {:>12.3}  {:>12.3}", times[0], times[1]);
        cached.push(times[0]);
        remote.push(times[1]);
    }
    let (c, r) = (median(&mut cached), median(&mut remote));
    println!("median: cached {c:.3} s, engine from S3 {r:.3} s; cached / from S3 = {:.3}", c / r);
    Ok(())
}
