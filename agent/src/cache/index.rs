//! The index of what is cached: one JSON document per model under `<root>/index/`,
//! replaced atomically on every change. It survives restarts and is what the agent reports
//! to the controller, so it never claims more than is on disk: a file is listed as ready
//! only after it was verified and renamed into place.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use super::verify::VerificationKind;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("index {path}: not a valid index entry: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    Downloading,
    Verifying,
    Ready,
    Failed,
    Evicting,
}

impl EntryState {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Downloading => "downloading",
            EntryState::Verifying => "verifying",
            EntryState::Ready => "ready",
            EntryState::Failed => "failed",
            EntryState::Evicting => "evicting",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub key: String,
    pub size: u64,
    /// Source version (ETag, version id, mtime+inode) at download time.
    pub version: String,
    /// How the file was verified; None until it is ready.
    #[serde(with = "crate::cache::verify::verification_field")]
    pub verification: Option<VerificationKind>,
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub id: String,
    pub uri: String,
    pub revision: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub state: EntryState,
    pub files: Vec<FileEntry>,
    pub bytes_present: u64,
    pub bytes_total: u64,
    /// The weakest verification over all files: what the whole model can be trusted as.
    /// None until every file is ready.
    #[serde(with = "crate::cache::verify::verification_field")]
    pub verification: Option<VerificationKind>,
    pub pinned: bool,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub last_used: u64,
    pub error: Option<String>,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl IndexEntry {
    /// The verification as the report and logs spell it: `""` until every file is ready.
    pub fn verification_label(&self) -> &'static str {
        self.verification.map_or("", VerificationKind::as_str)
    }

    /// Recomputes the derived fields (bytes present, overall verification) from the files.
    pub fn refresh(&mut self) {
        self.bytes_total = self.files.iter().map(|f| f.size).sum();
        self.bytes_present = self.files.iter().filter(|f| f.ready).map(|f| f.size).sum();
        self.verification = if self.files.is_empty() || self.files.iter().any(|f| !f.ready) {
            None
        } else {
            // A ready file without a recorded verification counts as unverified.
            self.files.iter().map(|f| f.verification.unwrap_or(VerificationKind::Unverified)).min()
        };
    }
}

/// The on-disk index.
#[derive(Debug, Clone)]
pub struct Index {
    dir: PathBuf,
}

impl Index {
    pub fn new(cache_root: &Path) -> Self {
        Self { dir: cache_root.join("index") }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn put(&self, e: &IndexEntry) -> Result<(), IndexError> {
        let path = self.path(&e.id);
        let json = serde_json::to_vec_pretty(e).map_err(|source| IndexError::Parse { path: path.clone(), source })?;
        hearth_service::fsutil::write_atomic(&path, &json, false).map_err(|source| IndexError::Io { path, source })
    }

    pub fn get(&self, id: &str) -> Result<Option<IndexEntry>, IndexError> {
        let path = self.path(id);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|source| IndexError::Parse { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IndexError::Io { path, source }),
        }
    }

    pub fn remove(&self, id: &str) -> Result<(), IndexError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => hearth_service::fsutil::sync_dir(&self.dir).map_err(|source| IndexError::Io { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(IndexError::Io { path, source }),
        }
    }

    /// Every entry, sorted by id. An unreadable entry is returned as an error beside the
    /// others rather than hiding them.
    pub fn list(&self) -> Result<(Vec<IndexEntry>, Vec<IndexError>), IndexError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), Vec::new()));
            }
            Err(source) => {
                return Err(IndexError::Io { path: self.dir.clone(), source });
            }
        };
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for ent in rd {
            let ent = ent.map_err(|source| IndexError::Io { path: self.dir.clone(), source })?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json").filter(|_| !name.starts_with('.')) {
                match self.get(id) {
                    Ok(Some(e)) => ok.push(e),
                    Ok(None) => {}
                    Err(e) => bad.push(e),
                }
            }
        }
        ok.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((ok, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> IndexEntry {
        IndexEntry {
            id: id.into(),
            uri: "s3://b/m/".into(),
            revision: String::new(),
            include: vec![],
            exclude: vec![],
            state: EntryState::Downloading,
            files: vec![
                FileEntry { key: "a".into(), size: 10, version: "e1".into(), verification: Some(VerificationKind::Checksum), ready: true },
                FileEntry { key: "b".into(), size: 30, version: "e2".into(), verification: None, ready: false },
            ],
            bytes_present: 0,
            bytes_total: 0,
            verification: None,
            pinned: false,
            created: 1,
            last_used: 1,
            error: None,
        }
    }

    #[test]
    fn verification_reads_the_strings_index_files_always_had() {
        let f: FileEntry = serde_json::from_str(r#"{"key":"a","size":1,"version":"v","verification":"checksum","ready":true}"#).unwrap();
        assert_eq!(f.verification, Some(VerificationKind::Checksum));
        let f: FileEntry = serde_json::from_str(r#"{"key":"a","size":1,"version":"v","verification":"","ready":false}"#).unwrap();
        assert_eq!(f.verification, None);
        assert!(serde_json::to_string(&f).unwrap().contains(r#""verification":"""#));
        let err = serde_json::from_str::<FileEntry>(r#"{"key":"a","size":1,"version":"v","verification":"sha1","ready":true}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected checksum, manifest, unverified") && err.contains("sha1"), "{err}");
    }

    #[test]
    fn refresh_derives_bytes_and_weakest_verification() {
        let mut e = entry("m");
        e.refresh();
        assert_eq!((e.bytes_present, e.bytes_total, e.verification), (10, 40, None));
        e.files[1].ready = true;
        e.files[1].verification = Some(VerificationKind::Unverified);
        e.refresh();
        assert_eq!((e.bytes_present, e.verification), (40, Some(VerificationKind::Unverified)));
    }

    #[test]
    fn put_get_list_remove_and_bad_entries_are_reported() {
        let d = tempfile::tempdir().unwrap();
        let idx = Index::new(d.path());
        assert!(idx.list().unwrap().0.is_empty());
        idx.put(&entry("b")).unwrap();
        idx.put(&entry("a")).unwrap();
        std::fs::write(d.path().join("index/broken.json"), b"{").unwrap();
        let (ok, bad) = idx.list().unwrap();
        assert_eq!(ok.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("broken.json"), "{}", bad[0]);
        idx.remove("a").unwrap();
        assert_eq!(idx.get("a").unwrap(), None);
        assert_eq!(idx.get("b").unwrap().unwrap(), entry("b"));
    }
}
