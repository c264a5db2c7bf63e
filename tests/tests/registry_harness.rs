#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The image test harness itself: images built by `TestImage` and pushed to a real
//! `docker-registry` read back through `RegProxy` with each of its behaviours (ranges
//! honoured or refused, token auth, a per-connection cap, latency, a corrupted blob), then
//! pulled by containerd 1.6 and 1.7 through the proxy. Needs `docker-registry` (apt); the
//! `root_` tests also need root, containerd and runc, and containerd 1.7 unpacked by
//! scripts/test.sh. Each fails saying what is missing.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use bytes::Bytes;
use hearth_tests::containerd::{Containerd, CriOptions, Options, containerd_17_dir};
use hearth_tests::registry::{self, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, PushedImage, Registry, TestImage, sha256_digest};
use hearth_tests::regproxy::{RegProxy, RegProxyOptions, SERVICE};
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const MIB: u64 = 1 << 20;
const USER: &str = "hearth";
const PASSWORD: &str = "s3cret";

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A plain-HTTP client; requests share its connection pool.
#[derive(Clone)]
struct Http(Client<HttpConnector, Full<Bytes>>);

impl Http {
    fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    async fn send(&self, method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Result<Reply> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.0.request(req.body(Full::new(Bytes::from(body.to_owned())))?).await.with_context(|| url.to_owned())?;
        let (parts, body) = resp.into_parts();
        Ok(Reply { status: parts.status, headers: parts.headers, body: body.collect().await?.to_bytes() })
    }

    async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        self.send(Method::GET, url, headers, "").await
    }
}

async fn pushed_small(reg: &Registry) -> Result<(TestImage, PushedImage)> {
    let image = TestImage::small()?;
    let pushed = reg.push("hearth/small", "v1", &image).await?;
    Ok((image, pushed))
}

#[tokio::test]
async fn registry_serves_a_pushed_image_by_tag_and_its_blobs_whole_and_ranged_through_the_proxy() -> Result<()> {
    let reg = Registry::start().await?;
    let (image, pushed) = pushed_small(&reg).await?;
    assert_eq!(pushed.reference, format!("{}/hearth/small:v1", reg.host()));
    assert_eq!((pushed.blobs_uploaded, pushed.blobs_skipped), (4, 0), "a config and three layers");
    assert_eq!(pushed.layers.len(), 3);
    assert_eq!(pushed.total_bytes, pushed.config.size + pushed.layers.iter().map(|l| l.size).sum::<u64>());
    assert!(pushed.total_bytes > 6 * MIB);
    let again = reg.push("hearth/small", "v2", &image).await?;
    assert_eq!((again.blobs_uploaded, again.blobs_skipped), (0, 4), "a second push finds every blob there");

    let proxy = RegProxy::start(reg.addr(), RegProxyOptions::default()).await?;
    let http = Http::new();
    let base = proxy.endpoint();
    let m = http.get(&format!("{base}{}", pushed.manifest_path("v1")), &[("accept", MANIFEST_MEDIA_TYPE)]).await?;
    assert_eq!(m.status, StatusCode::OK, "{}", String::from_utf8_lossy(&m.body));
    assert_eq!(m.header("content-type"), MANIFEST_MEDIA_TYPE);
    assert_eq!(m.header("docker-content-digest"), pushed.manifest_digest);
    assert_eq!(sha256_digest(&m.body), pushed.manifest_digest, "the manifest is served byte for byte as pushed");
    let manifest = m.json();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["layers"][1]["digest"], pushed.layers[1].digest.as_str());
    assert_eq!(manifest["layers"][1]["mediaType"], "application/vnd.oci.image.layer.v1.tar");

    let layer = &pushed.layers[1];
    let want = image.blob_bytes(&layer.digest)?;
    let blob_url = format!("{base}{}", pushed.blob_path(&layer.digest));
    let whole = http.get(&blob_url, &[]).await?;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len() as u64, layer.size);
    assert_eq!(sha256_digest(&whole.body), layer.digest);
    assert!(whole.body == want);

    let ranged = http.get(&blob_url, &[("range", "bytes=1000-1999")]).await?;
    assert_eq!(ranged.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.header("content-range"), format!("bytes 1000-1999/{}", layer.size));
    assert!(ranged.body == want[1000..2000]);

    let s = proxy.stats();
    assert_eq!((s.requests, s.range_requests), (3, 1), "{s:?}");
    assert_eq!(s.bytes_served, m.body.len() as u64 + layer.size + 1000, "{s:?}");
    assert!(s.connections >= 1, "{s:?}");

    // A registry without range support answers the same request with the whole blob.
    proxy.set_refuse_ranges(true);
    let refused = http.get(&blob_url, &[("range", "bytes=1000-1999")]).await?;
    assert_eq!(refused.status, StatusCode::OK);
    assert!(refused.body == want);
    assert_eq!(proxy.stats().range_requests, 2, "a Range header is counted even when refused");

    // HEAD keeps the registry's length (clients size their ranges by it).
    let head = http.send(Method::HEAD, &blob_url, &[], "").await?;
    assert_eq!((head.status, head.header("content-length")), (StatusCode::OK, layer.size.to_string().as_str()));
    assert!(head.body.is_empty());

    // Pushing through the proxy: request bodies stream upstream, and the upload Locations the
    // registry builds from the Host header lead back through the proxy.
    let before = proxy.stats().requests;
    let via = registry::push_to(proxy.addr(), "hearth/via-proxy", "v1", &TestImage::random(&[64 << 10])?).await?;
    assert_eq!(via.blobs_uploaded, 2);
    assert_eq!(proxy.stats().requests - before, 2 * 3 + 1, "HEAD, POST and PUT per blob, then the manifest");
    let m = http.get(&format!("{}{}", reg.endpoint(), via.manifest_path("v1")), &[("accept", MANIFEST_MEDIA_TYPE)]).await?;
    assert_eq!(sha256_digest(&m.body), via.manifest_digest);
    Ok(())
}

#[tokio::test]
async fn registry_tags_a_two_platform_index_whose_manifests_name_their_platforms() -> Result<()> {
    let reg = Registry::start().await?;
    let image = TestImage::builder(&[MIB, 2 * MIB]).multi_platform().build()?;
    let pushed = reg.push("hearth/multi", "v1", &image).await?;
    let index_digest = pushed.index_digest.clone().context("a multi-platform push has an index")?;
    assert_eq!(pushed.tag_digest(), index_digest);

    let proxy = RegProxy::start(reg.addr(), RegProxyOptions::default()).await?;
    let http = Http::new();
    let base = proxy.endpoint();
    let accept = format!("{INDEX_MEDIA_TYPE}, {MANIFEST_MEDIA_TYPE}");
    let r = http.get(&format!("{base}{}", pushed.manifest_path("v1")), &[("accept", &accept)]).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), INDEX_MEDIA_TYPE);
    assert_eq!(sha256_digest(&r.body), index_digest);
    let index = r.json();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    assert_eq!(manifests[0]["platform"], serde_json::json!({"os": "linux", "architecture": "amd64"}));
    assert_eq!(manifests[0]["digest"], pushed.manifest_digest.as_str());
    assert_eq!(manifests[1]["platform"], serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"}));

    // The arm64 manifest by digest: its own config and its own last layer.
    let arm_digest = manifests[1]["digest"].as_str().unwrap();
    let arm = http.get(&format!("{base}{}", pushed.manifest_path(arm_digest)), &[("accept", MANIFEST_MEDIA_TYPE)]).await?;
    assert_eq!(arm.status, StatusCode::OK);
    let arm = arm.json();
    let config = http.get(&format!("{base}{}", pushed.blob_path(arm["config"]["digest"].as_str().unwrap())), &[]).await?;
    let config = config.json();
    assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("arm64"), Some("linux")));
    let layer_digests: Vec<serde_json::Value> = arm["layers"].as_array().unwrap().iter().map(|l| l["digest"].clone()).collect();
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::Value::Array(layer_digests), "uncompressed: diff ids are layer digests");
    assert_eq!(arm["layers"][0]["digest"], pushed.layers[0].digest.as_str(), "the first layer is shared");
    assert_ne!(arm["layers"][1]["digest"], pushed.layers[1].digest.as_str(), "the last is arm64's own");
    Ok(())
}

#[tokio::test]
async fn regproxy_token_auth_challenges_then_accepts_tokens_for_the_right_basic_credentials() -> Result<()> {
    let reg = Registry::start().await?;
    let (_image, pushed) = pushed_small(&reg).await?;
    let opts = RegProxyOptions { token_auth: Some((USER.into(), PASSWORD.into())), ..Default::default() };
    let proxy = RegProxy::start(reg.addr(), opts).await?;
    let http = Http::new();
    let base = proxy.endpoint();
    let manifest_url = format!("{base}{}", pushed.manifest_path("v1"));
    let accept = ("accept", MANIFEST_MEDIA_TYPE);

    let ping = http.get(&format!("{base}/v2/"), &[]).await?;
    assert_eq!(ping.status, StatusCode::UNAUTHORIZED);
    assert_eq!(ping.header("www-authenticate"), format!("Bearer realm=\"{}\",service=\"{SERVICE}\"", proxy.realm()));
    let denied = http.get(&manifest_url, &[accept]).await?;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        denied.header("www-authenticate"),
        format!("Bearer realm=\"{}\",service=\"{SERVICE}\",scope=\"repository:hearth/small:pull\"", proxy.realm())
    );
    assert_eq!(denied.json()["errors"][0]["code"], "UNAUTHORIZED");

    let token_url = format!("{}?service={SERVICE}&scope=repository%3Ahearth%2Fsmall%3Apull", proxy.realm());
    let basic = |user: &str, pass: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
    let anonymous = http.get(&token_url, &[]).await?;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "anonymous pulls are denied");
    let wrong = http.get(&token_url, &[("authorization", &basic(USER, "wrong"))]).await?;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let granted = http.get(&token_url, &[("authorization", &basic(USER, PASSWORD))]).await?;
    assert_eq!(granted.status, StatusCode::OK, "{}", String::from_utf8_lossy(&granted.body));
    let grant = granted.json();
    let token = grant["token"].as_str().unwrap().to_owned();
    assert_eq!(grant["access_token"], token.as_str());
    assert_eq!(grant["expires_in"], 300);
    assert_eq!(grant["scope"], "repository:hearth/small:pull");

    let bearer = format!("Bearer {token}");
    let ok = http.get(&manifest_url, &[accept, ("authorization", &bearer)]).await?;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(sha256_digest(&ok.body), pushed.manifest_digest);
    let forged = http.get(&manifest_url, &[accept, ("authorization", "Bearer not-a-token")]).await?;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);

    // The OAuth2 form containerd posts when it has credentials.
    let form = format!("grant_type=password&service={SERVICE}&client_id=test&username={USER}&password={PASSWORD}");
    let form_headers = [("content-type", "application/x-www-form-urlencoded")];
    let posted = http.send(Method::POST, &proxy.realm(), &form_headers, &form).await?;
    assert_eq!(posted.status, StatusCode::OK);
    let token2 = posted.json()["access_token"].as_str().unwrap().to_owned();
    let bearer2 = format!("Bearer {token2}");
    assert_eq!(http.get(&manifest_url, &[accept, ("authorization", &bearer2)]).await?.status, StatusCode::OK);
    let bad_form = form.replace(PASSWORD, "wrong");
    assert_eq!(http.send(Method::POST, &proxy.realm(), &form_headers, &bad_form).await?.status, StatusCode::UNAUTHORIZED);

    let s = proxy.stats();
    assert_eq!((s.token_requests, s.unauthorized), (5, 3), "{s:?}");
    proxy.revoke_tokens();
    assert_eq!(http.get(&manifest_url, &[accept, ("authorization", &bearer)]).await?.status, StatusCode::UNAUTHORIZED);
    proxy.set_token_auth(None);
    assert_eq!(http.get(&manifest_url, &[accept]).await?.status, StatusCode::OK, "auth turned off at run time");
    Ok(())
}

#[tokio::test]
async fn regproxy_caps_each_connection_and_delays_each_response() -> Result<()> {
    let reg = Registry::start().await?;
    let image = TestImage::random(&[8 * MIB])?;
    let pushed = reg.push("hearth/big", "v1", &image).await?;
    let layer = &pushed.layers[0];
    let opts = RegProxyOptions { per_connection_bytes_per_sec: Some(32 * MIB), ..Default::default() };
    let proxy = RegProxy::start(reg.addr(), opts).await?;
    let blob_url = format!("{}{}", proxy.endpoint(), pushed.blob_path(&layer.digest));

    // 8 MiB at 32 MiB/s: 0.25 s, less a 10 ms burst.
    let t = Instant::now();
    let r = Http::new().get(&blob_url, &[]).await?;
    let alone = t.elapsed();
    assert_eq!(sha256_digest(&r.body), layer.digest);
    assert!(alone >= Duration::from_millis(200), "8 MiB through a 32 MiB/s cap took {alone:?}");

    // Two connections at once: each is held to the cap on its own.
    let t = Instant::now();
    let (one, two) = (Http::new(), Http::new());
    let (a, b) = tokio::join!(one.get(&blob_url, &[]), two.get(&blob_url, &[]));
    let both = t.elapsed();
    assert_eq!(sha256_digest(&a?.body), layer.digest);
    assert_eq!(sha256_digest(&b?.body), layer.digest);
    assert!(both >= Duration::from_millis(200), "two capped connections took {both:?}");
    eprintln!("8 MiB at 32 MiB/s per connection: one connection {alone:?}, two in parallel {both:?}");
    assert_eq!(proxy.stats().connections, 3);

    proxy.set_per_connection_bytes_per_sec(None);
    proxy.set_latency(Duration::from_millis(300));
    let t = Instant::now();
    let r = Http::new().get(&format!("{}{}", proxy.endpoint(), pushed.manifest_path("v1")), &[("accept", MANIFEST_MEDIA_TYPE)]).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300), "300 ms of latency, answered in {:?}", t.elapsed());
    Ok(())
}

#[tokio::test]
async fn regproxy_corrupts_the_middle_byte_of_a_chosen_blob_in_whole_and_ranged_answers() -> Result<()> {
    let reg = Registry::start().await?;
    let (image, pushed) = pushed_small(&reg).await?;
    let proxy = RegProxy::start(reg.addr(), RegProxyOptions::default()).await?;
    let http = Http::new();
    let (bad, good) = (&pushed.layers[0], &pushed.layers[1]);
    let want = image.blob_bytes(&bad.digest)?;
    let url = format!("{}{}", proxy.endpoint(), pushed.blob_path(&bad.digest));
    proxy.corrupt_blob(&bad.digest);

    let middle = (bad.size / 2) as usize;
    let whole = http.get(&url, &[]).await?;
    assert_eq!(whole.body.len(), want.len());
    let differ: Vec<usize> = (0..want.len()).filter(|&i| whole.body[i] != want[i]).collect();
    assert_eq!(differ, [middle], "exactly the middle byte differs");
    assert_eq!(whole.body[middle], want[middle] ^ 0xff);

    let (first, last) = (middle - 100, middle + 100);
    let covering = http.get(&url, &[("range", &format!("bytes={first}-{last}"))]).await?;
    assert_eq!(covering.status, StatusCode::PARTIAL_CONTENT);
    let differ: Vec<usize> = (0..=last - first).filter(|&i| covering.body[i] != want[first + i]).collect();
    assert_eq!(differ, [middle - first], "a range over the middle carries the same flipped byte");
    let before = http.get(&url, &[("range", &format!("bytes=0-{}", middle - 1))]).await?;
    assert!(before.body == want[..middle], "a range short of the middle is intact");

    let other = http.get(&format!("{}{}", proxy.endpoint(), pushed.blob_path(&good.digest)), &[]).await?;
    assert_eq!(sha256_digest(&other.body), good.digest, "other blobs are intact");
    proxy.heal_blob(&bad.digest);
    assert_eq!(sha256_digest(&http.get(&url, &[]).await?.body), bad.digest);
    Ok(())
}

/// `ctr -n k8s.io images pull --plain-http` of a two-platform image through the proxy into
/// a harness containerd with CRI on: the tag lists with the index's digest, only the
/// linux/amd64 blobs are fetched, and a pull with credentials goes through the token flow.
async fn pull_through_proxy(opts: Options, want_version: &str) -> Result<()> {
    let reg = Registry::start().await?;
    let image = TestImage::builder(&[MIB, 2 * MIB, 3 * MIB]).multi_platform().build()?;
    let pushed = reg.push("hearth/multi", "v1", &image).await?;
    let proxy = RegProxy::start(reg.addr(), RegProxyOptions::default()).await?;
    let sandbox = format!("{}/pause:3.9", proxy.host());
    let ctrd = Containerd::start(opts.namespace("k8s.io").with_cri(CriOptions::new(&sandbox))).await?;
    let version = ctrd.server_version()?;
    ensure!(version.starts_with(want_version), "expected containerd {want_version}, got {version}");
    let plugins = ctrd.ctr(&["plugins", "list"])?;
    let cri = plugins.lines().find(|l| l.split_whitespace().nth(1) == Some("cri"));
    assert!(cri.is_some_and(|l| l.split_whitespace().last() == Some("ok")), "CRI plugin not ok:\n{plugins}\n{}", ctrd.log_text());
    let complaints = ctrd.config_complaints();
    assert!(complaints.is_empty(), "containerd {version} complained about its config:\n{}", complaints.join("\n"));
    let dropped = ctrd.settings_not_applied()?;
    assert!(dropped.is_empty(), "containerd {version} runs without these settings of its config: {dropped:?}");

    let reference = pushed.reference_via(&proxy.host());
    ctrd.ctr(&["images", "pull", "--plain-http", &reference])?;
    let listed = ctrd.ctr(&["images", "list"])?;
    let line = listed.lines().find(|l| l.split_whitespace().next() == Some(reference.as_str()));
    assert!(line.is_some_and(|l| l.contains(pushed.tag_digest())), "{reference} with digest {} not listed:\n{listed}", pushed.tag_digest());
    let content = ctrd.ctr(&["content", "list", "--quiet"])?;
    for layer in &pushed.layers {
        assert!(content.contains(&layer.digest), "layer {} not fetched:\n{content}", layer.digest);
    }
    let (_, arm_manifest) = image.manifests()[1];
    assert!(!content.contains(&arm_manifest.digest), "the arm64 manifest was fetched too:\n{content}");
    let s = proxy.stats();
    assert!(s.bytes_served >= pushed.total_bytes, "{s:?}, image of {} bytes", pushed.total_bytes);

    // With credentials, through the token flow; the blobs are there already, the new tag is not.
    let tagged = reg.push("hearth/multi", "v2", &image).await?;
    proxy.set_token_auth(Some((USER, PASSWORD)));
    let reference = tagged.reference_via(&proxy.host());
    let denied = ctrd.ctr_output(&["images", "pull", "--plain-http", &reference])?;
    assert!(!denied.status.success(), "an anonymous pull must be refused");
    let user = format!("{USER}:{PASSWORD}");
    ctrd.ctr(&["images", "pull", "--plain-http", "--user", &user, &reference])?;
    assert!(proxy.stats().token_requests > s.token_requests, "{:?}", proxy.stats());
    assert!(ctrd.ctr(&["images", "list", "--quiet"])?.lines().any(|l| l == reference));
    ctrd.stop()
}

// Multi-threaded: `ctr` runs as a blocking child process while the proxy serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_containerd_16_pulls_a_pushed_image_through_the_proxy() -> Result<()> {
    pull_through_proxy(Options::default(), "1.6.").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_containerd_17_pulls_a_pushed_image_through_the_proxy() -> Result<()> {
    pull_through_proxy(Options::default().binaries(&containerd_17_dir()?), "1.7.").await
}
