//! The model-weight cache on local NVMe. It owns everything under the cache root: sources
//! (S3, POSIX mounts; peers later), the download engine, verification, the journal and the
//! index. It does not decide which models to cache (config and controller commands do) and
//! never talks to the controller itself: the report layer reads the index.

pub mod buf;
pub mod crc;
pub mod fetch;
pub mod index;
pub mod journal;
pub mod manager;
pub mod ordered;
pub mod ratelimit;
pub mod sample;
pub mod source;
pub mod spec;
mod subsystem;
mod trim;
pub mod verify;
#[cfg(test)]
mod verify_props;

pub use subsystem::start;

use std::sync::Arc;

use source::Source;
use spec::SourceUri;

/// Opens the source a model URI names.
pub async fn open_source(uri: &SourceUri, s3: &source::s3::S3Options) -> Arc<dyn Source> {
    match uri {
        SourceUri::S3 { bucket, prefix } => Arc::new(source::s3::S3Source::new(bucket, prefix, s3).await),
        SourceUri::Posix { root } => Arc::new(source::posix::PosixSource::new(root)),
    }
}

/// Where the cache lives when nothing says otherwise: `$HEARTH_CACHE_DIR`, else
/// `/var/lib/hearth/cache` for root, else `~/.cache/hearth`.
pub fn default_root() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("HEARTH_CACHE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    if rustix::process::geteuid().is_root() {
        return "/var/lib/hearth/cache".into();
    }
    let home = std::env::var_os("HOME").map_or_else(|| std::path::PathBuf::from("/tmp"), std::path::PathBuf::from);
    home.join(".cache/hearth")
}
