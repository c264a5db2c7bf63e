#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The cache on a small real filesystem: a tmpfs that fills up mid-download, and disk
//! watermarks forcing eviction. Needs root to mount the tmpfs; run as root (CI does), and
//! without it these tests fail and say so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use hearth_agent::cache::manager::{Cache, CacheConfig};
use hearth_agent::cache::spec::ModelSpec;
use hearth_tests::*;
use tokio_util::sync::CancellationToken;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self> {
        ensure!(rustix::process::geteuid().is_root(), "this test mounts a tmpfs and needs root; run the suite as root (CI does)");
        std::fs::create_dir_all(at)?;
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status()?;
        ensure!(st.success(), "mount tmpfs at {} failed", at.display());
        Ok(Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn same_files(src: &Path, out: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        assert_eq!(std::fs::read(e.path()).unwrap(), std::fs::read(out.join(e.file_name())).unwrap(), "{:?}", e.file_name());
    }
}

#[tokio::test]
async fn root_disk_full_mid_download_keeps_the_index_consistent_then_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src/model");
    hearth_agent::cache::sample::write_sample_model(&src, 3, 8 << 20)?;
    let fs = Tmpfs::mount(&dir.path().join("nvme"), "40m")?;
    let cache = fs.0.join("cache");
    let id = ModelSpec::new(&format!("file://{}", src.display()), &[], &[], "")?.id();
    let journal = cache.join("staging").join(&id).join("journal");
    let run = |name: &str| {
        Proc::spawn(
            name,
            Command::new(bin("hearth"))
                .args(["prefetch", &format!("file://{}", src.display()), "--quiet", "--part-size", "256Ki"])
                .args(["--limit-rate", "12Mi", "--dest"])
                .arg(&cache),
            dir.path(),
        )
    };
    let mut p = run("first")?;
    wait_for("download under way", Duration::from_secs(20), || async {
        Ok((std::fs::metadata(&journal).map(|m| m.len() / 24).unwrap_or(0) >= 8).then_some(()))
    })
    .await?;
    // Someone else fills the disk.
    let filler = fs.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler)?;
        let chunk = vec![1u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
    }
    let st = p.wait_exit(Duration::from_secs(30)).await?;
    let log = p.log_text();
    ensure!(st.is_some_and(|s| !s.success()), "the download must fail on a full disk: {st:?}\n{log}");
    assert!(log.contains("No space left on device"), "the error says why: {log}");
    // The index is whole, valid JSON, and claims nothing that is not there.
    let entry: hearth_agent::cache::index::IndexEntry =
        serde_json::from_slice(&std::fs::read(cache.join("index").join(format!("{id}.json")))?)?;
    for f in entry.files.iter().filter(|f| f.ready) {
        assert_eq!(std::fs::read(cache.join("models").join(&id).join(&f.key))?, std::fs::read(src.join(&f.key))?, "{}", f.key);
    }
    // Nothing half-published: whatever is under the final name is whole.
    if let Ok(rd) = std::fs::read_dir(cache.join("models").join(&id)) {
        for e in rd {
            let e = e?;
            assert_eq!(std::fs::read(e.path())?, std::fs::read(src.join(e.file_name()))?, "{:?}", e.file_name());
        }
    }

    std::fs::remove_file(&filler)?;
    let mut p = run("second")?;
    let st = p.wait_exit(Duration::from_secs(30)).await?;
    ensure!(st.is_some_and(|s| s.success()), "resume after freeing space: {st:?}\n{}", p.log_text());
    same_files(&src, &cache.join("models").join(&id));
    Ok(())
}

#[tokio::test]
async fn root_watermarks_evict_lru_unpinned_and_refuse_what_cannot_fit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fs = Tmpfs::mount(&dir.path().join("nvme"), "64m")?;
    let cfg = CacheConfig {
        root: fs.0.join("cache"),
        capacity: None,
        high_watermark: 0.6,
        low_watermark: 0.4,
        fetch: hearth_agent::cache::fetch::FetchConfig { part_size: 1 << 20, concurrency: 4, ..Default::default() },
        s3: Default::default(),
    };
    let cache = Cache::open(cfg, &mut prometheus_client::registry::Registry::default())?;
    let model = |name: &str, mib: u64| -> Result<ModelSpec> {
        let p = dir.path().join("src").join(name);
        hearth_agent::cache::sample::write_sample_model(&p, 1, mib << 20)?;
        Ok(ModelSpec::new(&format!("file://{}", p.display()), &["*.safetensors".into()], &[], "")?)
    };
    let (m1, m2, m3) = (model("m1", 14)?, model("m2", 14)?, model("m3", 14)?);
    let e1 = cache.ensure(&m1, CancellationToken::new()).await?;
    cache.pin(&e1.id, true)?;
    let e2 = cache.ensure(&m2, CancellationToken::new()).await?;
    // m3 would take the disk past 60%: the least recently used unpinned entry (m2) goes.
    let e3 = cache.ensure(&m3, CancellationToken::new()).await?;
    let ids: Vec<String> = cache.entries().into_iter().map(|e| e.id).collect();
    assert!(ids.contains(&e1.id) && ids.contains(&e3.id), "{ids:?}");
    assert!(!ids.contains(&e2.id), "m2 evicted: {ids:?}");
    // Too big to fit even after evicting every unpinned entry: a clear refusal, no download.
    cache.pin(&e3.id, true)?;
    let err = cache.ensure(&model("big", 30)?, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("needs") && err.contains("can free at most"), "{err}");
    assert!(!fs.0.join("cache/staging").read_dir().map(|mut d| d.next().is_some()).unwrap_or(false));
    Ok(())
}
