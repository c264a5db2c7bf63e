//! The node's containerd, through its socket: CRI's image service (what the kubelet uses, so
//! what Hearth pulls is what the kubelet finds) and containerd's own API where CRI has no
//! call: writing blobs into the content store, leases, image labels, the version.
//!
//! One lazily connected channel: a containerd restart breaks the calls in flight, and the
//! next call reconnects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hearth_proto::containerd::services::content::v1 as content;
use hearth_proto::containerd::services::images::v1 as images;
use hearth_proto::containerd::services::leases::v1 as leases;
use hearth_proto::containerd::services::version::v1 as version;
use hearth_proto::cri;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// The namespace the CRI plugin keeps Kubernetes' images in.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The label that makes containerd's CRI plugin (1.7 and later) report an image as pinned.
pub const PIN_LABEL: &str = "io.cri-containerd.pinned";
pub const PIN_VALUE: &str = "pinned";
/// Set beside the pin label on images Hearth pinned, so Hearth only ever removes its own pins.
pub const HEARTH_PIN_LABEL: &str = "hearth.dev/pinned";
/// Largest gRPC message sent while writing a blob (containerd accepts 16 MiB).
pub const WRITE_PIECE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("containerd socket {0}: not there (is containerd running, and its socket mounted into the agent?)")]
    MissingSocket(PathBuf),
    #[error("containerd {call}: {status}")]
    Rpc { call: &'static str, status: tonic::Status },
    #[error("containerd {call}: no answer within {timeout:?}")]
    Timeout { call: &'static str, timeout: Duration },
    #[error("content write {reference}: {message}")]
    Write { reference: String, message: String },
    #[error("content write {0}: containerd ended the stream (restarting?)")]
    Closed(String),
}

impl RuntimeError {
    /// containerd went away or restarted: worth waiting for and retrying.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RuntimeError::Rpc { status, .. } => {
                matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
            }
            RuntimeError::Timeout { .. } | RuntimeError::MissingSocket(_) | RuntimeError::Closed(_) => true,
            RuntimeError::Write { .. } => false,
        }
    }

    /// containerd's filesystem is full (it passes ENOSPC on as text).
    pub fn is_disk_full(&self) -> bool {
        match self {
            RuntimeError::Rpc { status, .. } => status.message().contains("no space left on device"),
            RuntimeError::Write { message, .. } => message.contains("no space left on device"),
            _ => false,
        }
    }

    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            RuntimeError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Runtime {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    timeout: Duration,
}

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> RuntimeError {
    move |status| RuntimeError::Rpc { call, status }
}

impl Runtime {
    /// A client of the containerd at `socket`; connects on first use.
    pub fn new(socket: &Path, namespace: &str, timeout: Duration) -> Result<Self, RuntimeError> {
        let path = socket.to_path_buf();
        // The URI is required by the API and ignored by the connector.
        let channel = tonic::transport::Endpoint::from_static("http://containerd.invalid")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = path.clone();
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
            }));
        Ok(Self { channel, socket: socket.to_path_buf(), namespace: namespace.to_owned(), timeout })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn check_socket(&self) -> Result<(), RuntimeError> {
        if self.socket.exists() { Ok(()) } else { Err(RuntimeError::MissingSocket(self.socket.clone())) }
    }

    /// A request in this client's namespace, under `lease` when given.
    fn req<T>(&self, msg: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = MetadataValue::try_from(self.namespace.as_str()) {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(l) = lease
            && let Ok(v) = MetadataValue::try_from(l)
        {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    async fn timed<T>(
        &self,
        call: &'static str,
        f: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, RuntimeError> {
        self.check_socket()?;
        tokio::time::timeout(self.timeout, f).await.map_err(|_| RuntimeError::Timeout { call, timeout: self.timeout })?.map_err(rpc(call))
    }

    fn cri(&self) -> cri::image_service_client::ImageServiceClient<Channel> {
        cri::image_service_client::ImageServiceClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    /// containerd's version, e.g. "1.6.20~ds1" or "v1.7.24".
    pub async fn version(&self) -> Result<String, RuntimeError> {
        let mut c = version::version_client::VersionClient::new(self.channel.clone());
        Ok(self.timed("Version", c.version(self.req((), None))).await?.into_inner().version)
    }

    /// The CRI plugin's registry host directory (`registry.config_path`, where containerd
    /// reads a `hosts.toml` per registry on every pull), from CRI's verbose status. `None`
    /// when it is not set (the deprecated `registry.mirrors` tables are used then, or none).
    pub async fn registry_config_path(&self) -> Result<Option<String>, RuntimeError> {
        let mut c = cri::runtime_service_client::RuntimeServiceClient::new(self.channel.clone()).max_decoding_message_size(64 << 20);
        let info = self.timed("Status", c.status(cri::StatusRequest { verbose: true })).await?.into_inner().info;
        let Some(config) = info.get("config") else { return Ok(None) };
        let v: serde_json::Value = serde_json::from_str(config)
            .map_err(|e| RuntimeError::Rpc { call: "Status", status: tonic::Status::internal(format!("config is not JSON: {e}")) })?;
        Ok(v.pointer("/registry/configPath").and_then(|p| p.as_str()).filter(|p| !p.is_empty()).map(str::to_owned))
    }

    /// CRI ImageStatus; None when the runtime does not have the image.
    pub async fn image_status(&self, image: &str) -> Result<Option<cri::Image>, RuntimeError> {
        let req = cri::ImageStatusRequest { image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }), verbose: false };
        Ok(self.timed("ImageStatus", self.cri().image_status(req)).await?.into_inner().image)
    }

    pub async fn list_images(&self) -> Result<Vec<cri::Image>, RuntimeError> {
        Ok(self.timed("ListImages", self.cri().list_images(cri::ListImagesRequest::default())).await?.into_inner().images)
    }

    /// CRI PullImage: what the kubelet does. No timeout of ours: a large image takes minutes,
    /// and the caller's cancellation ends it.
    pub async fn pull(&self, image: &str, auth: Option<cri::AuthConfig>) -> Result<String, RuntimeError> {
        self.pull_leased(image, auth, None).await
    }

    /// CRI PullImage under `lease`: containerd's pull then takes the caller's lease instead of
    /// making its own, and its unfinished writes outlive a failed or cancelled pull (its own
    /// lease goes with the pull, and the writes with it), so the next pull resumes them.
    pub async fn pull_leased(&self, image: &str, auth: Option<cri::AuthConfig>, lease: Option<&str>) -> Result<String, RuntimeError> {
        self.check_socket()?;
        let req = cri::PullImageRequest { image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }), auth };
        Ok(self.cri().pull_image(self.req(req, lease)).await.map_err(rpc("PullImage"))?.into_inner().image_ref)
    }

    pub async fn remove(&self, image: &str) -> Result<(), RuntimeError> {
        let req = cri::RemoveImageRequest { image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }) };
        self.timed("RemoveImage", self.cri().remove_image(req)).await?;
        Ok(())
    }

    fn images(&self) -> images::images_client::ImagesClient<Channel> {
        images::images_client::ImagesClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    /// containerd's image records in this namespace (CRI keeps three per image: the tag, the
    /// digest reference and the id, all with one target).
    pub async fn image_records(&self) -> Result<Vec<images::Image>, RuntimeError> {
        Ok(self.timed("Images.List", self.images().list(self.req(images::ListImagesRequest::default(), None))).await?.into_inner().images)
    }

    /// Sets (`Some`) or removes (`None`) labels on one image record, touching no other label.
    /// The record goes whole (target included) although the mask names only the labels:
    /// containerd 1.7.24 dereferences the target of every update and crashes without one.
    pub async fn set_labels(&self, record: &images::Image, labels: &[(&str, Option<&str>)]) -> Result<(), RuntimeError> {
        let mut set = HashMap::new();
        let mut paths = Vec::new();
        for (k, v) in labels {
            paths.push(format!("labels.{k}"));
            if let Some(v) = v {
                set.insert((*k).to_owned(), (*v).to_owned());
            }
        }
        let req = images::UpdateImageRequest {
            image: Some(images::Image { name: record.name.clone(), labels: set, target: record.target.clone(), ..Default::default() }),
            update_mask: Some(hearth_proto::prost_types::FieldMask { paths }),
        };
        self.timed("Images.Update", self.images().update(self.req(req, None))).await?;
        Ok(())
    }

    fn content(&self) -> content::content_client::ContentClient<Channel> {
        content::content_client::ContentClient::new(self.channel.clone())
    }

    /// Whether the content store has the blob.
    pub async fn has_blob(&self, digest: &str) -> Result<bool, RuntimeError> {
        match self.timed("Content.Info", self.content().info(self.req(content::InfoRequest { digest: digest.into() }, None))).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Drops an unfinished write (a blob that failed verification).
    pub async fn abort(&self, reference: &str) -> Result<(), RuntimeError> {
        match self.timed("Content.Abort", self.content().abort(self.req(content::AbortRequest { r#ref: reference.into() }, None))).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Unfinished writes whose ref starts with `prefix`, with the bytes each holds.
    pub async fn ingests(&self, prefix: &str) -> Result<Vec<(String, u64)>, RuntimeError> {
        let r = self
            .timed("Content.ListStatuses", self.content().list_statuses(self.req(content::ListStatusesRequest::default(), None)))
            .await?;
        Ok(r.into_inner().statuses.into_iter().filter(|s| s.r#ref.starts_with(prefix)).map(|s| (s.r#ref, s.offset.max(0) as u64)).collect())
    }

    /// Creates (or finds) a lease that expires on its own after `expire`, so that what a
    /// crashed agent wrote is collected eventually.
    pub async fn lease(&self, id: &str, expire: Duration) -> Result<(), RuntimeError> {
        let until = humantime::format_rfc3339_seconds(SystemTime::now() + expire).to_string();
        let req = leases::CreateRequest { id: id.into(), labels: HashMap::from([("containerd.io/gc.expire".to_owned(), until)]) };
        let mut c = leases::leases_client::LeasesClient::new(self.channel.clone());
        match self.timed("Leases.Create", c.create(self.req(req, None))).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Drops a lease; `sync` also runs containerd's garbage collection before answering, so
    /// what only the lease held is gone (its space free) when this returns.
    pub async fn drop_lease(&self, id: &str, sync: bool) -> Result<(), RuntimeError> {
        let mut c = leases::leases_client::LeasesClient::new(self.channel.clone());
        match self.timed("Leases.Delete", c.delete(self.req(leases::DeleteRequest { id: id.into(), sync }, None))).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens (or resumes) the write of one blob under `lease`. The first exchange asks where
    /// the write stands: a resumed write continues from the returned offset.
    pub async fn open_write(&self, reference: &str, lease: &str, digest: &str, size: u64) -> Result<BlobWriter, RuntimeError> {
        self.check_socket()?;
        let (tx, rx) = mpsc::channel::<content::WriteContentRequest>(PIPELINE);
        let stat = content::WriteContentRequest {
            action: content::WriteAction::Stat as i32,
            r#ref: reference.into(),
            total: size as i64,
            expected: digest.into(),
            ..Default::default()
        };
        tx.send(stat).await.map_err(|_| RuntimeError::Write { reference: reference.into(), message: "request stream closed".into() })?;
        let mut c = self.content().max_encoding_message_size(WRITE_PIECE + (1 << 16));
        let call = c.write(self.req(ReceiverStream::new(rx), Some(lease)));
        let mut responses = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| RuntimeError::Timeout { call: "Content.Write", timeout: self.timeout })?
            .map_err(rpc("Content.Write"))?
            .into_inner();
        let first = tokio::time::timeout(self.timeout, responses.message())
            .await
            .map_err(|_| RuntimeError::Timeout { call: "Content.Write", timeout: self.timeout })?
            .map_err(rpc("Content.Write"))?
            .ok_or_else(|| RuntimeError::Write { reference: reference.into(), message: "containerd closed the write at once".into() })?;
        Ok(BlobWriter {
            reference: reference.into(),
            digest: digest.into(),
            size,
            offset: first.offset.max(0) as u64,
            unanswered: std::collections::VecDeque::new(),
            tx,
            responses,
            timeout: self.timeout,
        })
    }
}

/// One blob's write stream. Data goes in order; containerd checks size and digest at commit.
pub struct BlobWriter {
    reference: String,
    digest: String,
    size: u64,
    /// Bytes sent (the next write's offset).
    offset: u64,
    /// The offsets containerd must answer with, oldest first: writes are pipelined, not
    /// answered one by one, so a stream moves data while containerd writes the last piece.
    unanswered: std::collections::VecDeque<u64>,
    tx: mpsc::Sender<content::WriteContentRequest>,
    responses: tonic::Streaming<content::WriteContentResponse>,
    timeout: Duration,
}

/// Pieces in flight on one write stream before waiting for containerd's answers.
const PIPELINE: usize = 4;

impl BlobWriter {
    /// Where the content store's copy stands (non-zero when resuming).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn err(&self, message: impl Into<String>) -> RuntimeError {
        RuntimeError::Write { reference: self.reference.clone(), message: message.into() }
    }

    async fn exchange(&mut self, req: content::WriteContentRequest) -> Result<content::WriteContentResponse, RuntimeError> {
        if self.tx.send(req).await.is_err() {
            // The stream ended: its status says why.
            return match self.responses.message().await {
                Err(s) => Err(RuntimeError::Rpc { call: "Content.Write", status: s }),
                Ok(_) => Err(RuntimeError::Closed(self.reference.clone())),
            };
        }
        match tokio::time::timeout(self.timeout, self.responses.message()).await {
            Err(_) => Err(RuntimeError::Timeout { call: "Content.Write", timeout: self.timeout }),
            Ok(Err(s)) => Err(RuntimeError::Rpc { call: "Content.Write", status: s }),
            Ok(Ok(None)) => Err(RuntimeError::Closed(self.reference.clone())),
            Ok(Ok(Some(r))) => Ok(r),
        }
    }

    /// Waits for containerd's answer to the oldest unanswered piece and checks its offset.
    async fn answer(&mut self) -> Result<(), RuntimeError> {
        let Some(want) = self.unanswered.pop_front() else { return Ok(()) };
        let r = match tokio::time::timeout(self.timeout, self.responses.message()).await {
            Err(_) => return Err(RuntimeError::Timeout { call: "Content.Write", timeout: self.timeout }),
            Ok(Err(s)) => return Err(RuntimeError::Rpc { call: "Content.Write", status: s }),
            Ok(Ok(None)) => return Err(RuntimeError::Closed(self.reference.clone())),
            Ok(Ok(Some(r))) => r,
        };
        if r.offset as u64 != want {
            return Err(self.err(format!("containerd is at offset {} where {want} was written", r.offset)));
        }
        Ok(())
    }

    /// Appends `data` at the current offset. Pieces are pipelined, at most `PIPELINE`
    /// unanswered; every answer is checked (here or at commit).
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), RuntimeError> {
        while !data.is_empty() {
            while self.unanswered.len() >= PIPELINE {
                self.answer().await?;
            }
            let piece = data.split_to(data.len().min(WRITE_PIECE));
            let n = piece.len() as u64;
            let req = content::WriteContentRequest {
                action: content::WriteAction::Write as i32,
                offset: self.offset as i64,
                data: piece,
                ..Default::default()
            };
            if self.tx.send(req).await.is_err() {
                // The stream ended: its status says why.
                return match self.responses.message().await {
                    Err(s) => Err(RuntimeError::Rpc { call: "Content.Write", status: s }),
                    Ok(_) => Err(RuntimeError::Closed(self.reference.clone())),
                };
            }
            self.offset += n;
            self.unanswered.push_back(self.offset);
        }
        Ok(())
    }

    /// Stores the blob under its digest; containerd refuses it if size or digest differ.
    pub async fn commit(mut self) -> Result<(), RuntimeError> {
        while !self.unanswered.is_empty() {
            self.answer().await?;
        }
        let req = content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            offset: self.offset as i64,
            total: self.size as i64,
            expected: self.digest.clone(),
            ..Default::default()
        };
        match self.exchange(req).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
