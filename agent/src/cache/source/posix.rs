//! A directory on a mounted filesystem (FSx for Lustre, NFS, local disk) as a source.
//!
//! Symlinks are handled deliberately: a link to a file is followed and cached as a regular
//! file, also when it points outside the root (the Hugging Face hub cache links each
//! snapshot's files to blobs two levels up); a link to a directory is followed once, with
//! loops detected by (device, inode); a dangling link is an error naming it. Special files
//! (sockets, devices, FIFOs) are skipped.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{BoxFut, Checked, ErrorKind, RemoteObject, Source, SourceError};
use crate::cache::buf::AlignedBuf;

#[derive(Debug)]
pub struct PosixSource {
    root: PathBuf,
    /// Open handles by key, so every part of a file does not reopen it.
    open: Mutex<std::collections::HashMap<String, Arc<File>>>,
}

impl PosixSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), open: Mutex::default() }
    }

    fn name_str(&self) -> String {
        format!("file://{}", self.root.display())
    }

    pub(crate) fn walk(&self) -> Result<Vec<RemoteObject>, SourceError> {
        let list_err =
            |what: &Path, reason: String| SourceError::List { source_name: self.name_str(), what: what.display().to_string(), reason };
        let meta = std::fs::metadata(&self.root).map_err(|e| list_err(&self.root, e.to_string()))?;
        if !meta.is_dir() {
            return Err(list_err(&self.root, "not a directory".into()));
        }
        let mut out = Vec::new();
        let mut seen_dirs = HashSet::new();
        seen_dirs.insert((meta.dev(), meta.ino()));
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| list_err(&dir, e.to_string()))?;
            for entry in entries {
                let entry = entry.map_err(|e| list_err(&dir, e.to_string()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                let key = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
                // metadata() follows symlinks; a dangling one fails here.
                let m = std::fs::metadata(&path).map_err(|e| {
                    let is_link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
                    list_err(&path, if is_link { format!("dangling symlink: {e}") } else { e.to_string() })
                })?;
                if m.is_dir() {
                    if seen_dirs.insert((m.dev(), m.ino())) {
                        stack.push((path, key));
                    }
                } else if m.is_file() {
                    out.push(RemoteObject {
                        key,
                        size: m.len(),
                        version: format!("{}.{}-{}-{}", m.mtime(), m.mtime_nsec(), m.ino(), m.len()),
                        vouched: None,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn handle(&self, key: &str) -> std::io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(key) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.root.join(key))?);
        open.insert(key.to_owned(), f.clone());
        Ok(f)
    }
}

impl Source for PosixSource {
    fn name(&self) -> String {
        crate::cache::spec::SourceUri::Posix { root: self.root.clone() }.source_key()
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
        Box::pin(async move {
            let me = PosixSource::new(self.root.clone());
            tokio::task::spawn_blocking(move || me.walk())
                .await
                .unwrap_or_else(|e| Err(SourceError::List { source_name: self.name_str(), what: "walk".into(), reason: e.to_string() }))
        })
    }

    fn read_into<'a>(
        &'a self,
        obj: &'a RemoteObject,
        offset: u64,
        mut buf: AlignedBuf,
    ) -> BoxFut<'a, (AlignedBuf, Result<Checked, SourceError>)> {
        Box::pin(async move {
            let len = buf.len();
            let read_err =
                |reason: String, kind| SourceError::Read { source_name: self.name_str(), key: obj.key.clone(), offset, len, reason, kind };
            let file = match self.handle(&obj.key) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return (buf, Err(SourceError::NotFound { source_name: self.name_str(), key: obj.key.clone() }));
                }
                Err(e) => return (buf, Err(read_err(e.to_string(), ErrorKind::Transient))),
            };
            let joined = tokio::task::spawn_blocking(move || {
                let r = file.read_exact_at(buf.as_mut_slice(), offset);
                (buf, r)
            })
            .await;
            match joined {
                // A file system keeps no checksum of its own to check against.
                Ok((buf, Ok(()))) => (buf, Ok(None)),
                Ok((buf, Err(e))) => {
                    // A file that shrank under us changed: retrying will not help.
                    let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof { ErrorKind::Permanent } else { ErrorKind::Transient };
                    (buf, Err(read_err(e.to_string(), kind)))
                }
                Err(e) => (AlignedBuf::new(len), Err(read_err(format!("read task failed: {e}"), ErrorKind::Transient))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_nested_files_follows_file_and_dir_links_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("model");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("config.json"), b"{}").unwrap();
        std::fs::write(root.join("sub/deeper/w.bin"), vec![7u8; 10_000]).unwrap();
        // A blob outside the root, linked in (the HF hub cache layout).
        std::fs::write(d.path().join("blob"), b"outside").unwrap();
        std::os::unix::fs::symlink(d.path().join("blob"), root.join("linked.json")).unwrap();
        // A directory link back to the root: followed once, not forever.
        std::os::unix::fs::symlink(&root, root.join("sub/loop")).unwrap();
        let src = PosixSource::new(&root);
        let objs = src.list().await.unwrap();
        let keys: Vec<_> = objs.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, vec!["config.json", "linked.json", "sub/deeper/w.bin"]);
        assert_eq!(objs[1].size, 7);

        let w = &objs[2];
        let mut buf = AlignedBuf::new(100);
        let r;
        (buf, r) = src.read_into(w, 9_950, buf).await;
        assert!(r.is_err(), "reading past the end is a short read");
        buf.set_len(50);
        let (buf, r) = src.read_into(w, 9_950, buf).await;
        r.unwrap();
        assert_eq!(buf.as_slice(), &[7u8; 50][..]);
    }

    #[tokio::test]
    async fn dangling_link_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(d.path().join("nowhere"), d.path().join("broken.bin")).unwrap();
        let e = PosixSource::new(d.path()).list().await.unwrap_err().to_string();
        assert!(e.contains("broken.bin") && e.contains("dangling symlink"), "{e}");
    }

    #[tokio::test]
    async fn missing_root_is_an_error() {
        let e = PosixSource::new("/nonexistent/model").list().await.unwrap_err().to_string();
        assert!(e.contains("/nonexistent/model"), "{e}");
    }
}
