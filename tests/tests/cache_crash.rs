#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! `hearth prefetch` killed with SIGKILL at random points, again and again, then run to the
//! end: the cache is byte-identical to the source, and each kill cost at most the parts that
//! were in flight or waiting for their fsync.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use hearth_agent::cache::spec::ModelSpec;
use hearth_tests::*;

const PART: u64 = 256 << 10;
const CONCURRENCY: u64 = 4;

fn journal_records(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len() / 24).unwrap_or(0)
}

/// Bytes this process has read through read(2)/pread(2) (the POSIX source's part reads).
fn rchar(pid: i32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn same_tree(a: &Path, b: &Path) {
    let mut n = 0;
    for e in std::fs::read_dir(a).unwrap() {
        let e = e.unwrap();
        let other = b.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            same_tree(&e.path(), &other);
        } else {
            assert_eq!(std::fs::read(e.path()).unwrap(), std::fs::read(&other).unwrap(), "{}", other.display());
        }
        n += 1;
    }
    assert_eq!(n, std::fs::read_dir(b).unwrap().count(), "{} has extra files", b.display());
}

#[tokio::test]
async fn kill_dash_nine_ten_times_then_resume_is_identical_and_bounded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src/llama-tiny");
    hearth_agent::cache::sample::write_sample_model(&src, 3, 12 << 20)?;
    let cache = dir.path().join("cache");
    let id = ModelSpec::new(&format!("file://{}", src.display()), &[], &[], "")?.id();
    let journal = cache.join("staging").join(&id).join("journal");
    let prefetch = |log: &str| -> Result<Proc> {
        Proc::spawn(
            log,
            Command::new(bin("hearth"))
                .args(["prefetch", &format!("file://{}", src.display()), "--quiet"])
                .arg("--dest")
                .arg(&cache)
                .args(["--part-size", "256Ki", "--concurrency", "4", "--limit-rate", "24Mi"])
                .env("RUST_LOG", "hearth_agent=info"),
            dir.path(),
        )
    };

    let mut kills = 0;
    let mut last_records = 0;
    for attempt in 0..40 {
        if kills == 10 {
            break;
        }
        let mut p = prefetch(&format!("run-{attempt}"))?;
        // A random kill point: once the journal has grown by 1 to 12 parts.
        let target = last_records + 1 + fastrand_u64(attempt) % 12;
        let cell = std::cell::RefCell::new(&mut p);
        let reached = wait_for("journal growth", Duration::from_secs(20), || async {
            if cell.borrow_mut().child.try_wait()?.is_some() {
                return Ok(Some(false));
            }
            Ok((journal_records(&journal) >= target).then_some(true))
        })
        .await?;
        if !reached {
            // It finished first: nothing left to interrupt.
            break;
        }
        p.signal("STOP")?;
        let read = rchar(p.pid());
        p.kill9()?;
        kills += 1;
        let records = journal_records(&journal);
        let durable = (records - last_records) * PART;
        // Everything read but not journaled was lost to the kill: in flight (one part per
        // worker), queued for the committer (two per worker) or being synced.
        let wasted = read.saturating_sub(durable);
        let bound = (3 * CONCURRENCY + 4) * PART;
        assert!(wasted <= bound, "kill {kills}: read {read} bytes, {durable} became durable; lost {wasted} > bound {bound}");
        eprintln!("kill {kills}: journal {records} parts, read {read} B, durable {durable} B, lost {wasted} B (bound {bound})");
        last_records = records;
    }
    assert!(kills >= 10, "only {kills} kills landed before the download finished");

    let mut last = prefetch("final")?;
    let st = last.wait_exit(Duration::from_secs(60)).await?;
    assert!(st.is_some_and(|s| s.success()), "final run: {st:?}\n{}", last.log_text());
    let log = last.log_text();
    assert!(log.contains("resuming an interrupted download"), "{log}");
    same_tree(&src, &cache.join("models").join(&id));
    assert!(!cache.join("staging").join(&id).exists());
    Ok(())
}

/// Deterministic variety without a dependency: the kill points differ per attempt.
fn fastrand_u64(seed: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}
