//! A real OCI registry for image tests, and images to put in it without any image tool.
//!
//! [`Registry`] runs Debian's `docker-registry` (the CNCF distribution registry, 2.8) on a
//! loopback port it picks itself, with filesystem storage in a temp dir of its own, killed
//! on drop. [`TestImage`] builds an image of random, uncompressed tar layers, streamed to
//! files in a temp dir with their digests computed on the way (so multi-gigabyte images do
//! not sit in memory), a config, a manifest and optionally a two-platform index.
//! [`Registry::push`] uploads it through the distribution API over plain HTTP, the way a
//! client would: HEAD to skip blobs already there, POST and PUT per blob, the manifests last.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use hearth_tests::registry::{Registry, TestImage};
//! let reg = Registry::start().await?;
//! let image = TestImage::small()?;
//! let pushed = reg.push("hearth/small", "v1", &image).await?;
//! // `ctr images pull --plain-http {pushed.reference}`, or through a proxy:
//! // pushed.reference_via(&proxy.host())
//! # Ok(()) }
//! ```

use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::{Proc, require_tool, wait_for};

pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

const MIB: u64 = 1 << 20;
/// Blobs are generated and uploaded in pieces of this size.
const BLOCK: usize = 1 << 20;
/// Random bytes each image's layers are cut from (see `Filler`).
const POOL: usize = 8 << 20;
/// The arm64 manifest's own layer (see [`TestImageBuilder::multi_platform`]).
const ARM64_LAYER_BYTES: u64 = 64 << 10;
/// Blob uploads in flight at once: the registry hashes each upload on one core, so a few
/// at a time keep the machine busy.
const UPLOADS_IN_FLIGHT: usize = 4;

/// A `docker-registry` process of a test's own. See the module doc.
pub struct Registry {
    proc: Proc,
    addr: SocketAddr,
    client: PushClient,
    // Dropped after `proc`: the storage goes once the process is dead.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("addr", &self.addr).field("dir", &self.dir.path()).finish()
    }
}

impl Registry {
    /// Starts the registry on `127.0.0.1:0` and returns once `GET /v2/` answers.
    pub async fn start() -> Result<Self> {
        let bin = require_tool("docker-registry", "apt-get install -y docker-registry")?;
        let dir = tempfile::Builder::new().prefix("hearth-registry-").tempdir()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let config = dir.path().join("config.yml");
        // A fixed secret silences the "generated random secret" warning; uploads never span
        // registries here. Upload purging would only delete half-done uploads of a long test.
        let yaml = serde_json::json!({
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": true}},
            "storage": {
                "filesystem": {"rootdirectory": storage},
                "delete": {"enabled": true},
                "maintenance": {"uploadpurging": {"enabled": false}},
            },
            "http": {"addr": "127.0.0.1:0", "secret": "hearth-test-registry"},
        });
        std::fs::write(&config, serde_yaml_ng::to_string(&yaml)?)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config);
        // REGISTRY_* variables override the config file; none of the caller's may leak in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let mut proc = Proc::spawn("docker-registry", &mut cmd, dir.path())?;
        // Port 0: the registry logs the address it got (`listening on 127.0.0.1:PORT`).
        let line = proc.wait_for_log_line("listening on ", Duration::from_secs(15)).await?;
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == '"').next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| anyhow!("no address in docker-registry's log line {line:?}"))?;
        let reg = Self { proc, addr, client: PushClient::new(), dir };
        let client = reg.client.clone();
        wait_for("docker-registry to answer GET /v2/", Duration::from_secs(15), || {
            let client = client.clone();
            async move {
                let resp = client.send(Method::GET, &format!("http://{addr}/v2/"), &[], empty()).await?;
                Ok((resp.status() == StatusCode::OK).then_some(()))
            }
        })
        .await
        .with_context(|| reg.log_text())?;
        Ok(reg)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`: the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The registry's filesystem storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's own log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Uploads `image` as `repo:tag`: every blob not there yet, then the manifests, then the
    /// index if the image has one (so the tag names the index).
    pub async fn push(&self, repo: &str, tag: &str, image: &TestImage) -> Result<PushedImage> {
        push_to(self.addr, repo, tag, image).await.with_context(|| format!("pushing {repo}:{tag} to {}", self.addr))
    }
}

/// [`Registry::push`] to any registry endpoint without authentication (a proxy in front of
/// a [`Registry`], say).
pub async fn push_to(registry: SocketAddr, repo: &str, tag: &str, image: &TestImage) -> Result<PushedImage> {
    let p = Pusher { client: PushClient::new(), base: format!("http://{registry}"), repo: repo.to_owned() };
    let mut seen = HashSet::new();
    let mut pending: VecDeque<Blob> = image.blobs.iter().filter(|b| seen.insert(b.desc.digest.clone())).cloned().collect();
    let (mut uploaded, mut skipped) = (0, 0);
    // Dropped on an error, aborting the uploads still running.
    let mut uploads = JoinSet::new();
    loop {
        while uploads.len() < UPLOADS_IN_FLIGHT
            && let Some(blob) = pending.pop_front()
        {
            let p = p.clone();
            uploads.spawn(async move {
                if p.blob_exists(&blob.desc.digest).await? {
                    return Ok(false);
                }
                p.upload_blob(&blob).await.map(|()| true)
            });
        }
        match uploads.join_next().await {
            None => break,
            Some(done) => match done?? {
                true => uploaded += 1,
                false => skipped += 1,
            },
        }
    }
    match &image.index {
        None => p.put_manifest(tag, &image.platforms[0].manifest).await?,
        Some(index) => {
            // An index may only name manifests the registry has: children by digest first.
            for m in &image.platforms {
                p.put_manifest(&m.manifest.desc.digest, &m.manifest).await?;
            }
            p.put_manifest(tag, index).await?;
        }
    }
    let amd64 = &image.platforms[0];
    let host = registry.to_string();
    Ok(PushedImage {
        reference: format!("{host}/{repo}:{tag}"),
        host,
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        manifest_digest: amd64.manifest.desc.digest.clone(),
        index_digest: image.index.as_ref().map(|i| i.desc.digest.clone()),
        config: amd64.config.clone(),
        layers: amd64.layers.clone(),
        total_bytes: image.total_bytes(),
        blobs_uploaded: uploaded,
        blobs_skipped: skipped,
    })
}

/// What [`Registry::push`] put where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `127.0.0.1:PORT/repo:tag`.
    pub reference: String,
    /// `127.0.0.1:PORT`.
    pub host: String,
    pub repo: String,
    pub tag: String,
    /// The linux/amd64 image manifest's digest (what containerd on this machine unpacks).
    pub manifest_digest: String,
    /// The index's digest, for a multi-platform image: then the tag names the index.
    pub index_digest: Option<String>,
    /// The linux/amd64 config blob.
    pub config: Descriptor,
    /// The linux/amd64 layers, in order.
    pub layers: Vec<Descriptor>,
    /// The linux/amd64 config and layer bytes: what a pull for this machine downloads.
    pub total_bytes: u64,
    pub blobs_uploaded: usize,
    /// Blobs the registry already had (HEAD answered 200).
    pub blobs_skipped: usize,
}

impl PushedImage {
    /// The same `repo:tag` at another host, e.g. a proxy's `127.0.0.1:PORT`.
    pub fn reference_via(&self, host: &str) -> String {
        format!("{host}/{}:{}", self.repo, self.tag)
    }

    /// What the tag resolves to: the index for a multi-platform image, else the manifest.
    pub fn tag_digest(&self) -> &str {
        self.index_digest.as_deref().unwrap_or(&self.manifest_digest)
    }

    /// `/v2/<repo>/blobs/<digest>`: a blob's path on the registry (or a proxy).
    pub fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.repo)
    }

    /// `/v2/<repo>/manifests/<reference>` for a tag or a digest.
    pub fn manifest_path(&self, reference: &str) -> String {
        format!("/v2/{}/manifests/{reference}", self.repo)
    }
}

/// A content descriptor as OCI manifests carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: &'static str,
    /// `sha256:<64 hex digits>`.
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// Where a blob's bytes are.
#[derive(Debug, Clone)]
enum Content {
    File(PathBuf),
    Memory(Bytes),
}

#[derive(Debug, Clone)]
struct Blob {
    desc: Descriptor,
    content: Content,
}

impl Blob {
    fn json(media_type: &'static str, value: &serde_json::Value) -> Result<Self> {
        let bytes = Bytes::from(serde_json::to_vec(value)?);
        let desc = Descriptor { media_type, digest: sha256_digest(&bytes), size: bytes.len() as u64 };
        Ok(Self { desc, content: Content::Memory(bytes) })
    }
}

/// `os/architecture[/variant]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Platform {
    pub os: &'static str,
    pub architecture: &'static str,
    pub variant: Option<&'static str>,
}

impl Platform {
    pub const LINUX_AMD64: Self = Self { os: "linux", architecture: "amd64", variant: None };
    pub const LINUX_ARM64: Self = Self { os: "linux", architecture: "arm64", variant: Some("v8") };

    fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"os": self.os, "architecture": self.architecture});
        if let Some(variant) = self.variant {
            v["variant"] = variant.into();
        }
        v
    }
}

#[derive(Debug)]
struct PlatformImage {
    platform: Platform,
    config: Descriptor,
    layers: Vec<Descriptor>,
    manifest: Blob,
}

/// An OCI image of random layers; its files live in a temp dir removed on drop. See the
/// module doc and [`TestImageBuilder`].
#[derive(Debug)]
pub struct TestImage {
    /// Every blob (configs and layers, shared layers once), in upload order.
    blobs: Vec<Blob>,
    /// linux/amd64 first.
    platforms: Vec<PlatformImage>,
    index: Option<Blob>,
    // Dropped last: holds the layer files.
    _dir: Option<tempfile::TempDir>,
}

impl TestImage {
    /// A linux/amd64 image with one layer per size: layer `i` is a tar holding `layer-i.bin`
    /// of that many random bytes.
    pub fn random(layer_sizes: &[u64]) -> Result<Self> {
        Self::builder(layer_sizes).build()
    }

    /// Three layers of 1, 2 and 3 MiB: quick to build, push and pull in functional tests.
    pub fn small() -> Result<Self> {
        Self::random(&[MIB, 2 * MIB, 3 * MIB])
    }

    pub fn builder(layer_sizes: &[u64]) -> TestImageBuilder {
        TestImageBuilder { layer_sizes: layer_sizes.to_vec(), multi_platform: false, cmd: vec!["/layer-0.bin".into()], dir: None }
    }

    /// The linux/amd64 manifest's digest.
    pub fn manifest_digest(&self) -> &str {
        &self.platforms[0].manifest.desc.digest
    }

    pub fn index_digest(&self) -> Option<&str> {
        self.index.as_ref().map(|i| i.desc.digest.as_str())
    }

    /// The linux/amd64 layers, in order.
    pub fn layers(&self) -> &[Descriptor] {
        &self.platforms[0].layers
    }

    /// The linux/amd64 config.
    pub fn config(&self) -> &Descriptor {
        &self.platforms[0].config
    }

    /// The manifests by platform, linux/amd64 first: (platform, manifest descriptor).
    pub fn manifests(&self) -> Vec<(Platform, &Descriptor)> {
        self.platforms.iter().map(|p| (p.platform, &p.manifest.desc)).collect()
    }

    /// The linux/amd64 config and layer bytes.
    pub fn total_bytes(&self) -> u64 {
        let p = &self.platforms[0];
        p.config.size + p.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// The file holding a layer blob (None for config and manifest blobs, kept in memory).
    pub fn blob_file(&self, digest: &str) -> Option<&Path> {
        self.blobs.iter().find(|b| b.desc.digest == digest).and_then(|b| match &b.content {
            Content::File(p) => Some(p.as_path()),
            Content::Memory(_) => None,
        })
    }

    /// A blob's, manifest's or index's bytes, read whole: for small images.
    pub fn blob_bytes(&self, digest: &str) -> Result<Vec<u8>> {
        let manifests = self.platforms.iter().map(|p| &p.manifest);
        let blob = self
            .blobs
            .iter()
            .chain(manifests)
            .chain(self.index.as_ref())
            .find(|b| b.desc.digest == digest)
            .ok_or_else(|| anyhow!("no blob {digest} in this image"))?;
        match &blob.content {
            Content::Memory(b) => Ok(b.to_vec()),
            Content::File(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
        }
    }
}

/// Options for a [`TestImage`].
#[derive(Debug, Clone)]
pub struct TestImageBuilder {
    layer_sizes: Vec<u64>,
    multi_platform: bool,
    cmd: Vec<String>,
    dir: Option<PathBuf>,
}

impl TestImageBuilder {
    /// Adds a linux/arm64/v8 manifest and tags an index of both, so a client must pick a
    /// platform. The arm64 image shares every amd64 layer but the last and has a 64 KiB
    /// layer of its own, so pulling the wrong platform fetches a blob the right one never
    /// names.
    pub fn multi_platform(mut self) -> Self {
        self.multi_platform = true;
        self
    }

    /// The config's `Cmd` (default `/layer-0.bin`; the layers hold no programs, so these
    /// images are for pulling, not running).
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Writes the layer files into a new temp dir under `dir` (default: under `$TMPDIR`).
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Generates the layers (blocking file writes and hashing: call it from
    /// `spawn_blocking` if other tasks of the test must run meanwhile).
    pub fn build(self) -> Result<TestImage> {
        ensure!(!self.layer_sizes.is_empty(), "an image needs at least one layer");
        let dir = match &self.dir {
            Some(d) => tempfile::Builder::new().prefix("hearth-image-").tempdir_in(d)?,
            None => tempfile::Builder::new().prefix("hearth-image-").tempdir()?,
        };
        let mut filler = Filler::new();
        let mut layers = Vec::new();
        for (i, &size) in self.layer_sizes.iter().enumerate() {
            let name = format!("layer-{i}.bin");
            layers.push(write_layer(&dir.path().join(format!("layer-{i}.tar")), &name, size, &mut filler)?);
        }
        let mut blobs = Vec::new();
        let mut platforms = Vec::new();
        let amd64 = self.platform_image(Platform::LINUX_AMD64, layers.iter().map(|b| b.desc.clone()).collect(), &mut blobs)?;
        platforms.push(amd64);
        if self.multi_platform {
            let own = write_layer(&dir.path().join("layer-arm64.tar"), "layer-arm64.bin", ARM64_LAYER_BYTES, &mut filler)?;
            let mut arm_layers: Vec<Descriptor> = layers[..layers.len() - 1].iter().map(|b| b.desc.clone()).collect();
            arm_layers.push(own.desc.clone());
            layers.push(own);
            platforms.push(self.platform_image(Platform::LINUX_ARM64, arm_layers, &mut blobs)?);
        }
        blobs.extend(layers);
        let index = match self.multi_platform {
            false => None,
            true => {
                let manifests: Vec<serde_json::Value> = platforms
                    .iter()
                    .map(|p| {
                        let mut d = p.manifest.desc.json();
                        d["platform"] = p.platform.json();
                        d
                    })
                    .collect();
                let index = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests});
                Some(Blob::json(INDEX_MEDIA_TYPE, &index)?)
            }
        };
        Ok(TestImage { blobs, platforms, index, _dir: Some(dir) })
    }

    /// The config and manifest of one platform's image; the config joins `blobs`.
    fn platform_image(&self, platform: Platform, layers: Vec<Descriptor>, blobs: &mut Vec<Blob>) -> Result<PlatformImage> {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let mut config = serde_json::json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": platform.architecture,
            "os": platform.os,
            "config": {
                "Cmd": self.cmd,
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            },
            // Uncompressed layers: each diff id is the layer's own digest.
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(variant) = platform.variant {
            config["variant"] = variant.into();
        }
        let config = Blob::json(CONFIG_MEDIA_TYPE, &config)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.desc.json(),
            "layers": layers.iter().map(Descriptor::json).collect::<Vec<_>>(),
        });
        let manifest = Blob::json(MANIFEST_MEDIA_TYPE, &manifest)?;
        let desc = config.desc.clone();
        blobs.push(config);
        Ok(PlatformImage { platform, config: desc, layers, manifest })
    }
}

/// Makes layer data quickly in any build profile: blocks are cut at random offsets from one
/// pool of random bytes per image, and each block's first 8 bytes are overwritten with a
/// running counter, so no two blocks anywhere in the image are equal (a range written to the
/// wrong offset cannot go unnoticed). Generating every byte with a PRNG runs at ~200 MB/s
/// in the unoptimised test build; copying runs at memory speed.
struct Filler {
    pool: Vec<u8>,
    block: u64,
    salt: u64,
}

impl Filler {
    fn new() -> Self {
        let mut rng = fastrand::Rng::new();
        let mut pool = vec![0u8; POOL];
        rng.fill(&mut pool);
        Self { pool, block: 0, salt: rng.u64(..) }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut at = fastrand::usize(..self.pool.len());
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.pool.len() - at);
            buf[done..done + n].copy_from_slice(&self.pool[at..at + n]);
            done += n;
            at = 0;
        }
        let stamp = (self.salt ^ self.block).to_le_bytes();
        let n = buf.len().min(stamp.len());
        buf[..n].copy_from_slice(&stamp[..n]);
        self.block += 1;
    }
}

/// Writes an uncompressed tar holding one regular file `name` of `size` random bytes to
/// `path`, hashing it on the way.
fn write_layer(path: &Path, name: &str, size: u64, filler: &mut Filler) -> Result<Blob> {
    let mut file =
        io::BufWriter::with_capacity(BLOCK, std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let mut hasher = sha2::Sha256::new();
    let mut written = 0u64;
    let mut put = |bytes: &[u8]| -> io::Result<()> {
        hasher.update(bytes);
        written += bytes.len() as u64;
        file.write_all(bytes)
    };
    put(&ustar_header(name, size)?)?;
    let mut buf = vec![0u8; BLOCK];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(BLOCK as u64))?;
        filler.fill(&mut buf[..n]);
        put(&buf[..n])?;
        left -= n as u64;
    }
    // Data padded to a 512-byte record, then the end-of-archive marker: two zero records.
    let pad = (512 - (size % 512) as usize) % 512;
    put(&vec![0u8; pad + 1024])?;
    file.flush()?;
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    let desc = Descriptor { media_type: LAYER_MEDIA_TYPE, digest, size: written };
    Ok(Blob { desc, content: Content::File(path.to_owned()) })
}

/// A POSIX ustar header for a regular file owned by root, mode 0644, at the epoch.
fn ustar_header(name: &str, size: u64) -> Result<[u8; 512]> {
    ensure!(name.len() < 100 && name.is_ascii(), "tar member name {name:?}: expected ASCII, under 100 bytes");
    // Eleven octal digits: a ustar size field tops out just below 8 GiB.
    ensure!(size < 1 << 33, "layer file of {size} bytes: ustar headers hold sizes below 8 GiB");
    let mut h = [0u8; 512];
    let mut field = |at: usize, value: &[u8]| h[at..at + value.len()].copy_from_slice(value);
    field(0, name.as_bytes());
    field(100, b"0000644\0");
    field(108, b"0000000\0");
    field(116, b"0000000\0");
    field(124, format!("{size:011o}\0").as_bytes());
    field(136, b"00000000000\0");
    field(156, b"0");
    field(257, b"ustar\0");
    field(263, b"00");
    field(265, b"root");
    field(297, b"root");
    field(329, b"0000000\0");
    field(337, b"0000000\0");
    // The checksum is the byte sum of the header with its own field read as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

type PushBody = BoxBody<Bytes, io::Error>;

fn empty() -> PushBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

/// A plain-HTTP client for the distribution API.
#[derive(Clone)]
struct PushClient(Client<HttpConnector, PushBody>);

impl PushClient {
    fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: PushBody,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut req = Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.0.request(req.body(body)?).await.with_context(|| format!("{method} {url}"))?;
        Ok(resp)
    }
}

#[derive(Clone)]
struct Pusher {
    client: PushClient,
    base: String,
    repo: String,
}

impl Pusher {
    async fn blob_exists(&self, digest: &str) -> Result<bool> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repo);
        let resp = self.client.send(Method::HEAD, &url, &[], empty()).await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => bail!("HEAD {url}: {s}"),
        }
    }

    /// A monolithic upload: POST opens a session, one PUT with the digest sends the bytes.
    async fn upload_blob(&self, blob: &Blob) -> Result<()> {
        let url = format!("{}/v2/{}/blobs/uploads/", self.base, self.repo);
        let resp = self.client.send(Method::POST, &url, &[("content-length", "0")], empty()).await?;
        let status = resp.status();
        let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = body_text(resp).await;
        ensure!(status == StatusCode::ACCEPTED, "POST {url}: {status}: {text}");
        let location = location.ok_or_else(|| anyhow!("POST {url}: 202 without a Location header"))?;
        // The registry answers with an absolute URL; a relative one is relative to the host.
        let mut put = if location.starts_with('/') { format!("{}{location}", self.base) } else { location };
        let sep = if put.contains('?') { '&' } else { '?' };
        write!(put, "{sep}digest={}", blob.desc.digest.replace(':', "%3A"))?;
        let len = blob.desc.size.to_string();
        let body = match &blob.content {
            Content::Memory(b) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
            Content::File(p) => FileBody::open(p, blob.desc.size).boxed(),
        };
        let headers = [("content-type", "application/octet-stream"), ("content-length", len.as_str())];
        let resp = self.client.send(Method::PUT, &put, &headers, body).await?;
        let status = resp.status();
        let text = body_text(resp).await;
        ensure!(status == StatusCode::CREATED, "PUT blob {} ({} bytes): {status}: {text}", blob.desc.digest, blob.desc.size);
        Ok(())
    }

    async fn put_manifest(&self, reference: &str, manifest: &Blob) -> Result<()> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repo);
        let Content::Memory(bytes) = &manifest.content else { bail!("manifest {} is not in memory", manifest.desc.digest) };
        let body = Full::new(bytes.clone()).map_err(|never| match never {}).boxed();
        let resp = self.client.send(Method::PUT, &url, &[("content-type", manifest.desc.media_type)], body).await?;
        let status = resp.status();
        let digest = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = body_text(resp).await;
        ensure!(status == StatusCode::CREATED, "PUT {url} ({}): {status}: {text}", manifest.desc.media_type);
        // The registry hashes the bytes it stored: a mismatch means it rewrote the manifest.
        ensure!(
            digest.as_deref() == Some(manifest.desc.digest.as_str()),
            "PUT {url}: registry reports digest {digest:?}, expected {}",
            manifest.desc.digest
        );
        Ok(())
    }
}

/// A response body as text, for error messages (an unreadable one reads as empty).
async fn body_text(resp: hyper::Response<hyper::body::Incoming>) -> String {
    match resp.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => format!("(body unreadable: {e})"),
    }
}

/// A file streamed as a request body with a known length, read on a blocking thread in
/// `BLOCK`-sized pieces a few at a time (the channel bounds what is in memory).
struct FileBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    remaining: u64,
}

impl FileBody {
    fn open(path: &Path, len: u64) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let result = (|| -> io::Result<()> {
                let mut file = std::fs::File::open(&path)?;
                let mut sent = 0u64;
                loop {
                    let mut buf = vec![0u8; BLOCK];
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    sent += n as u64;
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return Ok(()); // the request was dropped
                    }
                }
                // A file that changed size since it was hashed would send a body that lies.
                if sent != len {
                    return Err(io::Error::other(format!("{} has {sent} bytes, expected {len}", path.display())));
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Self { rx, remaining: len }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(b))) => {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header as `tar` itself reads it: GNU tar must list the member with its size.
    #[test]
    fn layers_are_tars_that_gnu_tar_lists() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut filler = Filler::new();
        let blob = write_layer(&dir.path().join("l.tar"), "layer-0.bin", 1_500_000, &mut filler)?;
        assert_eq!(blob.desc.size, 512 + 1_500_160 + 1024);
        let out = Command::new("tar").arg("-tvf").arg(dir.path().join("l.tar")).output()?;
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "tar -t failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(listing.contains(" 1500000 ") && listing.trim_end().ends_with("layer-0.bin"), "{listing}");
        assert_eq!(blob.desc.digest, sha256_digest(&std::fs::read(dir.path().join("l.tar"))?));
        Ok(())
    }

    #[test]
    fn no_two_blocks_of_layer_data_are_equal() {
        let mut filler = Filler::new();
        let mut seen = HashSet::new();
        for _ in 0..64 {
            let mut b = vec![0u8; BLOCK];
            filler.fill(&mut b);
            assert!(seen.insert(sha256_digest(&b)));
        }
    }

    #[test]
    fn multi_platform_image_shares_all_but_the_last_layer() -> Result<()> {
        let image = TestImage::builder(&[1000, 2000]).multi_platform().build()?;
        let index: serde_json::Value = serde_json::from_slice(&image.blob_bytes(image.index_digest().context("index")?)?)?;
        assert_eq!(index["manifests"][0]["platform"]["architecture"], "amd64");
        assert_eq!(index["manifests"][1]["platform"]["architecture"], "arm64");
        let arm: serde_json::Value = serde_json::from_slice(&image.blob_bytes(image.manifests()[1].1.digest.as_str())?)?;
        assert_eq!(arm["layers"][0]["digest"], image.layers()[0].digest.as_str());
        assert_ne!(arm["layers"][1]["digest"], image.layers()[1].digest.as_str());
        assert_eq!(image.total_bytes(), image.config().size + image.layers().iter().map(|l| l.size).sum::<u64>());
        Ok(())
    }
}
