//! Where weights come from, behind one trait: S3, a POSIX mount (FSx for Lustre), and later
//! peer agents. A source lists a model's objects and reads byte ranges of them into buffers
//! the engine owns, so memory stays bounded by the engine's concurrency.

pub mod fault;
pub mod posix;
pub mod s3;

use std::future::Future;
use std::pin::Pin;

use super::buf::AlignedBuf;
use super::verify::Vouched;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One object (file) of a model, as listed by its source.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteObject {
    /// Path relative to the model root, '/'-separated.
    pub key: String,
    pub size: u64,
    /// ETag, version id or (for POSIX) mtime+inode: changes when the content may have.
    pub version: String,
    /// What the source itself vouches for (an object checksum), if anything.
    pub vouched: Option<Vouched>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: listing {what}: {reason}")]
    List { source_name: String, what: String, reason: String },
    #[error("{source_name}: {key} not found")]
    NotFound { source_name: String, key: String },
    #[error("{source_name}: reading {key} at {offset}+{len}: {reason}")]
    Read { source_name: String, key: String, offset: u64, len: usize, reason: String, kind: ErrorKind },
    #[error("{source_name}: access denied: {reason}")]
    Denied { source_name: String, reason: String },
}

/// How a failed read should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Throttling (503 SlowDown, 429): retry after a longer pause.
    Throttled,
    /// Reset, timeout, short body, 5xx: retry.
    Transient,
    /// The object changed or vanished, or access was refused: do not retry.
    Permanent,
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Read { kind, .. } => *kind,
            SourceError::List { .. } => ErrorKind::Transient,
            SourceError::NotFound { .. } | SourceError::Denied { .. } => ErrorKind::Permanent,
        }
    }

    /// A bounded label for `..._errors_total{kind}`.
    pub fn label(&self) -> &'static str {
        match self {
            SourceError::List { .. } => "list",
            SourceError::NotFound { .. } => "not_found",
            SourceError::Denied { .. } => "denied",
            SourceError::Read { kind: ErrorKind::Throttled, .. } => "throttled",
            SourceError::Read { kind: ErrorKind::Transient, .. } => "transient",
            SourceError::Read { kind: ErrorKind::Permanent, .. } => "permanent",
        }
    }
}

/// What a read found out beyond its bytes: `Some` when the source checked the whole object it
/// read against its own checksum, and the bytes matched.
pub type Checked = Option<Vouched>;

pub trait Source: Send + Sync {
    /// "s3://bucket" or "file:///fsx": the key bandwidth is measured under.
    fn name(&self) -> String;
    /// Every object under the model root, with paths relative to it. Cheaply: a source whose
    /// checksums cost a request per object leaves `vouched` empty here (see `checksums`).
    fn list(&self) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>>;
    /// Fills in the source's own checksums of `objs`: the objects that will be read in
    /// several parts. An object read whole is checked by that read.
    fn checksums(&self, objs: Vec<RemoteObject>) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
        Box::pin(async move { Ok(objs) })
    }
    /// Fills `buf` (its whole length) with the object's bytes from `offset` and hands the
    /// buffer back, filled or not. A short read is an error.
    fn read_into<'a>(
        &'a self,
        obj: &'a RemoteObject,
        offset: u64,
        buf: AlignedBuf,
    ) -> BoxFut<'a, (AlignedBuf, Result<Checked, SourceError>)>;
}
