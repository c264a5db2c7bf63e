//! The index of what is cached: one JSON document per model under `<root>/index/`,
//! replaced atomically on every change. It survives restarts and is what the agent reports
//! to the controller, so it never claims more than is on disk: a file is listed as ready
//! only after it was verified and renamed into place.
//!
//! Read from disk once, on first use, and kept in memory after: every change is written to
//! disk first and then to memory, under one lock, so the two never disagree and reads (each
//! scrape and progress tick lists every model) touch no file. The process that opens the
//! cache root owns it: a second writer to the same root would not be seen.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use super::verify::VerificationKind;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("index {path}: not a valid index entry: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    /// A damaged entry found when the index was loaded (listed on every `list`).
    #[error("index {path}: not a valid index entry: {message}")]
    Damaged { path: PathBuf, message: String },
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

/// The index: on disk, and in memory once loaded. Clones share the memory.
#[derive(Debug, Clone)]
pub struct Index {
    dir: PathBuf,
    mem: Arc<Mutex<Option<Mem>>>,
}

#[derive(Debug, Default)]
struct Mem {
    entries: BTreeMap<String, IndexEntry>,
    /// Entries that did not parse at load: (file, why). Dropped when the id is written again.
    damaged: BTreeMap<String, (PathBuf, String)>,
}

impl Index {
    pub fn new(cache_root: &Path) -> Self {
        Self { dir: cache_root.join("index"), mem: Arc::default() }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Runs `f` on the loaded index, loading it first if this is the first use.
    fn with<R>(&self, f: impl FnOnce(&mut Mem) -> Result<R, IndexError>) -> Result<R, IndexError> {
        let mut guard = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.load()?);
        }
        f(guard.as_mut().expect("loaded above"))
    }

    fn load(&self) -> Result<Mem, IndexError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Mem::default()),
            Err(source) => return Err(IndexError::Io { path: self.dir.clone(), source }),
        };
        let mut mem = Mem::default();
        for ent in rd {
            let ent = ent.map_err(|source| IndexError::Io { path: self.dir.clone(), source })?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").filter(|_| !name.starts_with('.')) else { continue };
            let path = self.path(id);
            match std::fs::read(&path) {
                Ok(b) => match serde_json::from_slice::<IndexEntry>(&b) {
                    Ok(e) => {
                        mem.entries.insert(id.to_owned(), e);
                    }
                    Err(e) => {
                        mem.damaged.insert(id.to_owned(), (path, e.to_string()));
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(IndexError::Io { path, source }),
            }
        }
        Ok(mem)
    }

    /// Writes `e` to disk (atomically), then to memory.
    pub fn put(&self, e: &IndexEntry) -> Result<(), IndexError> {
        let path = self.path(&e.id);
        let json = serde_json::to_vec_pretty(e).map_err(|source| IndexError::Parse { path: path.clone(), source })?;
        self.with(|m| {
            hearth_service::fsutil::write_atomic(&path, &json, false).map_err(|source| IndexError::Io { path, source })?;
            m.entries.insert(e.id.clone(), e.clone());
            m.damaged.remove(&e.id);
            Ok(())
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<IndexEntry>, IndexError> {
        self.with(|m| Ok(m.entries.get(id).cloned()))
    }

    pub fn remove(&self, id: &str) -> Result<(), IndexError> {
        let path = self.path(id);
        self.with(|m| {
            match std::fs::remove_file(&path) {
                Ok(()) => hearth_service::fsutil::sync_dir(&self.dir).map_err(|source| IndexError::Io { path, source })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(IndexError::Io { path, source }),
            }
            m.entries.remove(id);
            m.damaged.remove(id);
            Ok(())
        })
    }

    /// Every entry, sorted by id. An unreadable entry is returned as an error beside the
    /// others rather than hiding them.
    pub fn list(&self) -> Result<(Vec<IndexEntry>, Vec<IndexError>), IndexError> {
        self.with(|m| {
            let bad =
                m.damaged.values().map(|(path, message)| IndexError::Damaged { path: path.clone(), message: message.clone() }).collect();
            Ok((m.entries.values().cloned().collect(), bad))
        })
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
        assert!(Index::new(d.path()).list().unwrap().0.is_empty());
        let earlier = Index::new(d.path());
        earlier.put(&entry("b")).unwrap();
        earlier.put(&entry("a")).unwrap();
        std::fs::write(d.path().join("index/broken.json"), b"{").unwrap();
        // What a restart finds: the damaged entry is reported beside the good ones.
        let idx = Index::new(d.path());
        let (ok, bad) = idx.list().unwrap();
        assert_eq!(ok.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("broken.json"), "{}", bad[0]);
        idx.remove("a").unwrap();
        assert_eq!(idx.get("a").unwrap(), None);
        assert_eq!(idx.get("b").unwrap().unwrap(), entry("b"));
        // Writing the damaged id again replaces it.
        let mut fixed = entry("broken");
        fixed.state = EntryState::Ready;
        idx.put(&fixed).unwrap();
        assert!(idx.list().unwrap().1.is_empty());
        assert_eq!(Index::new(d.path()).get("broken").unwrap().unwrap(), fixed, "written through to disk");
    }

    #[test]
    fn the_index_is_read_from_disk_once_and_written_through() {
        let d = tempfile::tempdir().unwrap();
        let first = Index::new(d.path());
        first.put(&entry("m")).unwrap();
        // Another opener (a restart) loads what was written.
        let idx = Index::new(d.path());
        assert_eq!(idx.list().unwrap().0, vec![entry("m")]);
        // Loaded once: reads no longer touch the files (gone behind its back, still listed).
        std::fs::remove_file(d.path().join("index/m.json")).unwrap();
        assert_eq!(idx.get("m").unwrap(), Some(entry("m")));
        assert_eq!(idx.list().unwrap().0.len(), 1);
        // Clones share it: a change through one is seen by the other, and is on disk.
        let clone = idx.clone();
        let mut e = entry("m");
        e.state = EntryState::Ready;
        clone.put(&e).unwrap();
        assert_eq!(idx.get("m").unwrap().unwrap().state, EntryState::Ready);
        assert!(d.path().join("index/m.json").exists());
        idx.remove("m").unwrap();
        assert!(clone.list().unwrap().0.is_empty() && !d.path().join("index/m.json").exists());
    }
}
