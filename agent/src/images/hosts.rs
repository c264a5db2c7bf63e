//! containerd's registry host directory (`registry.config_path`, e.g. /etc/containerd/certs.d):
//! one `<registry>/hosts.toml` per registry, read afresh on every pull. While Hearth pulls an
//! image it puts its own mirror first in that registry's file, so containerd's own fetcher
//! (which writes inside containerd, the cheap way) takes the blobs from Hearth's parallel
//! ranged GETs; containerd goes on to the next host on any error, so a dead or unwilling
//! mirror costs one refused connection per blob.
//!
//! The entry is there only for the pull: the first pull from a registry writes it, the last
//! one puts the operator's file back. A file that was there is kept beside ours and restored
//! byte for byte; a crash leaves ours behind, and `recover` at start puts things back.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{info, warn};

/// First line of every file Hearth writes; what `recover` looks for.
const MARK: &str = "# Written by Hearth while it pulls an image from this registry; removed after.";
const SAVED: &str = "hosts.toml.hearth-saved";

#[derive(Debug)]
pub struct HostsDir {
    dir: PathBuf,
    /// Pulls in flight per registry.
    active: Mutex<HashMap<String, usize>>,
}

impl HostsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), active: Mutex::default() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Puts `mirror` (an `http://…/v2` API root) first for `registry`; `server` is the
    /// registry's own URL, written when no file says it already.
    pub fn install(&self, registry: &str, server: &str, mirror: &str) -> io::Result<()> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let n = active.entry(registry.to_owned()).or_insert(0);
        if *n == 0 {
            self.write(registry, server, mirror)?;
        }
        *n += 1;
        Ok(())
    }

    /// `install` for the life of the returned guard: released when it is dropped, also when
    /// the pull's future is (cancelled at shutdown, or on error).
    pub fn hold(&self, registry: &str, server: &str, mirror: &str) -> io::Result<HostsGuard<'_>> {
        self.install(registry, server, mirror)?;
        Ok(HostsGuard { hosts: self, registry: registry.to_owned() })
    }

    /// Undoes one `install`; the last one puts the registry's file back as it was.
    pub fn release(&self, registry: &str) -> io::Result<()> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = active.get_mut(registry) else { return Ok(()) };
        *n -= 1;
        if *n > 0 {
            return Ok(());
        }
        active.remove(registry);
        self.restore(&self.dir.join(registry))
    }

    /// Puts back every registry's file that a previous run of Hearth left in place.
    pub fn recover(&self) -> io::Result<usize> {
        let mut n = 0;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for e in entries {
            let dir = e?.path();
            let ours = std::fs::read_to_string(dir.join("hosts.toml")).is_ok_and(|t| t.starts_with(MARK));
            if ours {
                warn!(dir = %dir.display(), "a previous run left its mirror entry in containerd's host config; putting the registry's file back");
                self.restore(&dir)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn write(&self, registry: &str, server: &str, mirror: &str) -> io::Result<()> {
        if registry.is_empty() || registry.contains('/') || registry.starts_with('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("registry host {registry:?} is not a directory name")));
        }
        let dir = self.dir.join(registry);
        let file = dir.join("hosts.toml");
        std::fs::create_dir_all(&dir)?;
        let original = match std::fs::read_to_string(&file) {
            Ok(t) if t.starts_with(MARK) => {
                // Ours from a crashed run: what it saved is the original.
                std::fs::read_to_string(dir.join(SAVED)).ok()
            }
            Ok(t) => {
                write_atomic(&dir.join(SAVED), t.as_bytes())?;
                Some(t)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The `_default` file applies to registries without their own: ours must not
                // shadow it, so it is the base (and nothing is saved: the file goes on release).
                std::fs::read_to_string(self.dir.join("_default").join("hosts.toml")).ok()
            }
            Err(e) => return Err(e),
        };
        let text = merged(original.as_deref(), server, mirror);
        write_atomic(&file, text.as_bytes())?;
        info!(file = %file.display(), mirror, "mirror entry in place for a pull");
        Ok(())
    }

    fn restore(&self, dir: &Path) -> io::Result<()> {
        let file = dir.join("hosts.toml");
        let saved = dir.join(SAVED);
        if saved.exists() {
            std::fs::rename(&saved, &file)?;
        } else {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            // Only removes a directory that is now empty (ours, made for the entry).
            let _ = std::fs::remove_dir(dir);
        }
        sync_dir(dir.parent().unwrap_or(dir));
        if dir.exists() {
            sync_dir(dir);
        }
        Ok(())
    }
}

/// One pull's hold on a registry's mirror entry.
#[derive(Debug)]
pub struct HostsGuard<'a> {
    hosts: &'a HostsDir,
    registry: String,
}

impl Drop for HostsGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.hosts.release(&self.registry) {
            warn!(registry = self.registry, error = %e, "could not put the registry's host config back");
        }
    }
}

/// The registry's file with the mirror's `[host]` table first: containerd tries hosts in the
/// order the file lists them, and top-level keys (the `server` and its settings) must come
/// before any table, so ours goes between them.
pub fn merged(original: Option<&str>, server: &str, mirror: &str) -> String {
    let original = original.unwrap_or("");
    let lines: Vec<&str> = original.lines().collect();
    let split = lines.iter().position(|l| l.trim_start().starts_with('[')).unwrap_or(lines.len());
    let (top, tables) = lines.split_at(split);
    let has_server = top.iter().any(|l| l.trim_start().strip_prefix("server").is_some_and(|r| r.trim_start().starts_with('=')));
    let mut out = String::new();
    out.push_str(MARK);
    out.push('\n');
    if !has_server {
        out.push_str(&format!("server = {}\n", toml_string(server)));
    }
    for l in top {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&format!("\n[host.{}]\n  capabilities = [\"pull\"]\n  override_path = true\n\n", toml_string(mirror)));
    for l in tables {
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn toml_string(s: &str) -> String {
    let mut o = String::from('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        sync_dir(d);
    }
    Ok(())
}

fn sync_dir(d: &Path) {
    if let Ok(f) = std::fs::File::open(d) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIRROR: &str = "http://10.1.2.3:4567/abc/v2";

    #[test]
    fn a_registry_without_a_file_gets_its_server_and_the_mirror_first() {
        let t = merged(None, "https://registry-1.docker.io", MIRROR);
        assert!(t.starts_with(MARK));
        let server = t.find("server = \"https://registry-1.docker.io\"").unwrap();
        let host = t.find("[host.\"http://10.1.2.3:4567/abc/v2\"]").unwrap();
        assert!(server < host, "{t}");
        assert!(t.contains("capabilities = [\"pull\"]") && t.contains("override_path = true"), "{t}");
    }

    #[test]
    fn an_operators_file_keeps_its_server_settings_and_hosts_after_the_mirror() {
        let original = "server = \"https://r.example\"\nca = \"/etc/ca.pem\"\n\n[host.\"https://cache.corp\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
        let t = merged(Some(original), "https://ignored", MIRROR);
        assert!(!t.contains("ignored"), "{t}");
        let ca = t.find("ca = ").unwrap();
        let ours = t.find(MIRROR).unwrap();
        let theirs = t.find("cache.corp").unwrap();
        assert!(ca < ours && ours < theirs, "{t}");
    }

    #[test]
    fn install_and_release_restore_the_original_byte_for_byte_and_count_pulls() {
        let d = tempfile::tempdir().unwrap();
        let h = HostsDir::new(d.path());
        let reg = d.path().join("r.example:5000");
        std::fs::create_dir_all(&reg).unwrap();
        let original = "# theirs\nserver = \"http://r.example:5000\"\n";
        std::fs::write(reg.join("hosts.toml"), original).unwrap();
        h.install("r.example:5000", "http://r.example:5000", MIRROR).unwrap();
        h.install("r.example:5000", "http://r.example:5000", MIRROR).unwrap();
        assert!(std::fs::read_to_string(reg.join("hosts.toml")).unwrap().contains(MIRROR));
        h.release("r.example:5000").unwrap();
        assert!(std::fs::read_to_string(reg.join("hosts.toml")).unwrap().contains(MIRROR), "a second pull still runs");
        h.release("r.example:5000").unwrap();
        assert_eq!(std::fs::read_to_string(reg.join("hosts.toml")).unwrap(), original);
        assert!(!reg.join(SAVED).exists());
    }

    #[test]
    fn a_file_made_for_the_pull_goes_with_its_directory_and_default_is_the_base() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("_default")).unwrap();
        std::fs::write(d.path().join("_default/hosts.toml"), "[host.\"https://all.corp\"]\n  capabilities = [\"pull\"]\n").unwrap();
        let h = HostsDir::new(d.path());
        h.install("docker.io", "https://registry-1.docker.io", MIRROR).unwrap();
        let t = std::fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        assert!(t.find(MIRROR).unwrap() < t.find("all.corp").unwrap(), "{t}");
        h.release("docker.io").unwrap();
        assert!(!d.path().join("docker.io").exists());
        assert!(d.path().join("_default/hosts.toml").exists());
    }

    #[test]
    fn recover_puts_back_what_a_crashed_run_left_and_a_second_install_keeps_the_original() {
        let d = tempfile::tempdir().unwrap();
        let reg = d.path().join("r.example");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(reg.join("hosts.toml"), "server = \"https://r.example\"\n").unwrap();
        let crashed = HostsDir::new(d.path());
        crashed.install("r.example", "https://r.example", MIRROR).unwrap();
        drop(crashed);
        // A new run installs again before recovering: the saved original must survive.
        let h = HostsDir::new(d.path());
        h.install("r.example", "https://r.example", "http://10.9.9.9:1/x/v2").unwrap();
        h.release("r.example").unwrap();
        assert_eq!(std::fs::read_to_string(reg.join("hosts.toml")).unwrap(), "server = \"https://r.example\"\n");
        let crashed = HostsDir::new(d.path());
        crashed.install("r.example", "https://r.example", MIRROR).unwrap();
        assert_eq!(HostsDir::new(d.path()).recover().unwrap(), 1);
        assert_eq!(std::fs::read_to_string(reg.join("hosts.toml")).unwrap(), "server = \"https://r.example\"\n");
        assert!(HostsDir::new(d.path()).install("bad/name", "x", MIRROR).is_err());
    }

    #[test]
    fn a_dropped_hold_puts_the_file_back() {
        let d = tempfile::tempdir().unwrap();
        let h = HostsDir::new(d.path());
        let g = h.hold("r.example", "https://r.example", MIRROR).unwrap();
        assert!(d.path().join("r.example/hosts.toml").exists());
        drop(g);
        assert!(!d.path().join("r.example").exists());
    }
}
