//! Image prefetch against a real containerd (Debian 12's 1.6 and Debian 13's 1.7, CRI plugin
//! on) and a real registry (Debian's docker-registry) behind a proxy that can cap each
//! connection's rate, demand token auth, refuse ranges or corrupt a blob. Needs root (CI
//! runs as root); without containerd, the registry or root these tests fail and say what is
//! missing (scripts/test.sh installs them).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_agent::images::pull::{Path as PullPath, Progress, PullError, PullSettings, Puller};
use hearth_agent::images::reference::Reference;
use hearth_agent::images::registry::{Credentials, RegistryClient};
use hearth_agent::images::runtime::{HEARTH_PIN_LABEL, PIN_LABEL, Runtime};
use hearth_agent::images::{ImageMetrics, ImageSettings, Images, MirrorSettings};
use hearth_tests::containerd::{Containerd, CriOptions, Options, containerd_17_dir};
use hearth_tests::registry::{PushedImage, Registry, TestImage};
use hearth_tests::regproxy::{RegProxy, RegProxyOptions};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Served to containerd's pull from Hearth's mirror.
    Mirror,
    /// Written through containerd's content API.
    Content,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V16,
    V17,
}

struct Env {
    ctrd: Containerd,
    registry: Registry,
    proxy: RegProxy,
    _dir: tempfile::TempDir,
}

async fn env(v: Version, proxy: RegProxyOptions) -> Result<Env> {
    let registry = Registry::start().await?;
    let mut opts = Options::default().namespace("k8s.io").with_cri(CriOptions::new(&format!("{}/pause:3.9", registry.host())));
    if v == Version::V17 {
        opts = opts.binaries(&containerd_17_dir()?);
    }
    let ctrd = Containerd::start(opts).await?;
    let proxy = RegProxy::start(registry.addr(), proxy).await?;
    Ok(Env { ctrd, registry, proxy, _dir: tempfile::tempdir()? })
}

impl Env {
    fn runtime(&self) -> Result<Runtime> {
        Ok(Runtime::new(self.ctrd.socket(), "k8s.io", Duration::from_secs(30))?)
    }

    /// What the agent runs by default: blobs served to containerd's own pull as a mirror.
    fn puller(&self, creds: Option<(&str, &str)>, settings: PullSettings) -> Result<Puller> {
        self.puller_via(Mode::Mirror, creds, settings)
    }

    fn puller_via(&self, mode: Mode, creds: Option<(&str, &str)>, settings: PullSettings) -> Result<Puller> {
        let creds = creds.map(|(u, p)| (self.proxy.host(), Credentials { username: u.into(), password: p.into() })).into_iter().collect();
        let registry = Arc::new(RegistryClient::new(creds, vec![])?);
        let mirror = match mode {
            Mode::Mirror => Some(Arc::new(self.mirror_settings().start(registry.clone(), &settings, None).map_err(anyhow::Error::msg)?)),
            Mode::Content => None,
        };
        Ok(Puller { registry, runtime: self.runtime()?, settings, limit: None, mirror })
    }

    fn mirror_settings(&self) -> MirrorSettings {
        MirrorSettings { hosts_dir: self.ctrd.dir().join("certs.d"), listen: ([127, 0, 0, 1], 0).into(), address: None }
    }

    fn images(&self, state: &std::path::Path) -> Result<Images> {
        let settings = ImageSettings { socket: self.ctrd.socket().to_owned(), mirror: Some(self.mirror_settings()), ..Default::default() };
        let metrics = ImageMetrics::register(&mut prometheus_client::registry::Registry::default());
        Ok(Images::new(settings, state, metrics, None)?)
    }

    /// Blobs in the content store, by digest (`ctr content ls`).
    fn content_has(&self, digest: &str) -> Result<bool> {
        Ok(self.ctrd.ctr(&["content", "ls", "-q"])?.lines().any(|l| l.trim() == digest))
    }
}

/// Waits until CRI reports `image` (still present) not pinned: containerd's CRI learns of
/// label changes from its event stream, a moment after the update.
async fn unpinned(rt: &Runtime, image: &str) -> Result<()> {
    hearth_tests::wait_for("CRI to report the image unpinned", Duration::from_secs(4), || async {
        Ok((!rt.image_status(image).await?.context("the image was removed")?.pinned).then_some(()))
    })
    .await
}

fn small_settings() -> PullSettings {
    // 1 MiB chunks: every layer of the small images takes several ranged GETs. The local
    // registry is faster than any object store: only the probe's own test lets it decide.
    PullSettings { connections: 4, chunk: MIB, direct_above: 0, ..Default::default() }
}

async fn pull(p: &Puller, reference: &str) -> Result<hearth_agent::images::pull::Pulled, PullError> {
    p.pull(&Reference::parse(reference).expect("valid reference"), &Arc::new(Progress::default()), &CancellationToken::new()).await
}

async fn pushed(env: &Env, repo: &str, image: &TestImage) -> Result<PushedImage> {
    env.registry.push(repo, "v1", image).await
}

async fn fast_pull_lands_the_image_for_cri(v: Version, mode: Mode) -> Result<()> {
    let env = env(v, RegProxyOptions::default()).await?;
    let img = pushed(&env, "team/app", &TestImage::random(&[3 * MIB, 5 * MIB, 2 * MIB + 17])?).await?;
    let reference = img.reference_via(&env.proxy.host());
    let before = env.proxy.stats();
    let hosts = env.ctrd.dir().join("certs.d").join(env.proxy.host());
    let p = pull(&env.puller_via(mode, None, small_settings())?, &reference).await?;
    let want = if mode == Mode::Mirror { PullPath::Mirror } else { PullPath::Content };
    ensure!(p.path == want, "expected the {want:?} path, got {p:?}");
    ensure!(!hosts.exists(), "the mirror's host config outlived the pull: {}", hosts.display());
    let layer_bytes: u64 = img.layers.iter().map(|l| l.size).sum();
    ensure!(p.fetched == layer_bytes, "fetched {} of {layer_bytes} layer bytes", p.fetched);
    let ranged = env.proxy.stats().range_requests - before.range_requests;
    ensure!(ranged >= 10, "expected one ranged GET per 1 MiB chunk (10+), saw {ranged}");
    let rt = env.runtime()?;
    let status = rt.image_status(&reference).await?.context("CRI does not have the image after the pull")?;
    ensure!(status.id == img.config.digest, "CRI's image id {} is not the config digest {}", status.id, img.config.digest);
    for l in &img.layers {
        ensure!(env.content_has(&l.digest)?, "layer {} not in the content store", l.digest);
    }
    // A second pull finds everything in place: nothing is fetched again.
    let again = pull(&env.puller_via(mode, None, small_settings())?, &reference).await?;
    ensure!(again.fetched == 0 && again.reused == layer_bytes, "second pull fetched {} and reused {}", again.fetched, again.reused);
    // The snapshotter has it unpacked: a container could start from it.
    let snaps = env.ctrd.ctr(&["snapshots", "ls"])?;
    ensure!(snaps.lines().count() > img.layers.len(), "snapshots after unpack:\n{snaps}");
    Ok(())
}

#[tokio::test]
async fn fast_pull_lands_the_image_for_cri_on_containerd_16() -> Result<()> {
    fast_pull_lands_the_image_for_cri(Version::V16, Mode::Mirror).await
}

#[tokio::test]
async fn fast_pull_lands_the_image_for_cri_on_containerd_17() -> Result<()> {
    fast_pull_lands_the_image_for_cri(Version::V17, Mode::Mirror).await
}

#[tokio::test]
async fn content_path_pull_lands_the_image_for_cri_on_containerd_17() -> Result<()> {
    fast_pull_lands_the_image_for_cri(Version::V17, Mode::Content).await
}

#[tokio::test]
async fn a_registry_faster_than_direct_above_per_connection_is_pulled_by_containerd_directly() -> Result<()> {
    // 8 MiB/s per connection, as an object store (scaled down): the fast path.
    let env = env(Version::V17, RegProxyOptions { per_connection_bytes_per_sec: Some(8 * MIB), ..Default::default() }).await?;
    let img = pushed(&env, "probe/app", &TestImage::random(&[4 * MIB, MIB])?).await?;
    let settings = PullSettings { direct_above: 32 * MIB, ..small_settings() };
    let p = pull(&env.puller(None, settings.clone())?, &img.reference_via(&env.proxy.host())).await?;
    ensure!(p.path == PullPath::Mirror, "a capped registry must take the fast path: {p:?}");
    // The registry directly: one connection brings far more than 32 MiB/s.
    let img = pushed(&env, "probe/local", &TestImage::random(&[4 * MIB, MIB])?).await?;
    let reference = img.reference_via(&env.registry.host());
    let p = pull(&env.puller(None, settings)?, &reference).await?;
    ensure!(p.path == PullPath::Fallback && p.fallback.as_ref().map(|f| f.0) == Some("fast_registry"), "{p:?}");
    ensure!(env.runtime()?.image_status(&reference).await?.is_some(), "the direct pull did not land the image");
    Ok(())
}

#[tokio::test]
async fn the_mirror_is_not_used_when_containerd_reads_another_host_dir_and_an_operators_file_survives() -> Result<()> {
    let env = env(Version::V17, RegProxyOptions::default()).await?;
    let img = pushed(&env, "team/conf", &TestImage::random(&[2 * MIB])?).await?;
    let reference = img.reference_via(&env.proxy.host());
    // An operator's own file for the registry: the mirror goes first for the pull, then the
    // file is back byte for byte.
    let dir = env.ctrd.dir().join("certs.d").join(env.proxy.host());
    std::fs::create_dir_all(&dir)?;
    let theirs = format!("# the operator's\nserver = \"http://{}\"\n", env.proxy.host());
    std::fs::write(dir.join("hosts.toml"), &theirs)?;
    let p = pull(&env.puller(None, small_settings())?, &reference).await?;
    ensure!(p.path == PullPath::Mirror, "{p:?}");
    ensure!(std::fs::read_to_string(dir.join("hosts.toml"))? == theirs, "the operator's hosts.toml changed");
    ensure!(std::fs::read_dir(&dir)?.count() == 1, "files left beside it: {:?}", std::fs::read_dir(&dir)?.collect::<Vec<_>>());
    // Hearth told to use a directory containerd does not read: the content path, no file.
    let other = tempfile::tempdir()?;
    let registry = Arc::new(RegistryClient::new(Default::default(), vec![])?);
    let settings = small_settings();
    let m = MirrorSettings { hosts_dir: other.path().to_owned(), listen: ([127, 0, 0, 1], 0).into(), address: None };
    let mirror = Some(Arc::new(m.start(registry.clone(), &settings, None).map_err(anyhow::Error::msg)?));
    let img2 = pushed(&env, "team/conf2", &TestImage::random(&[2 * MIB])?).await?;
    let p =
        pull(&Puller { registry, runtime: env.runtime()?, settings, limit: None, mirror }, &img2.reference_via(&env.proxy.host())).await?;
    ensure!(p.path == PullPath::Content && p.fetched == img2.layers[0].size, "{p:?}");
    ensure!(std::fs::read_dir(other.path())?.count() == 0, "wrote into a directory containerd does not read");
    Ok(())
}

#[tokio::test]
async fn pin_is_seen_through_cri_on_17_unpinned_on_release_and_other_pins_are_left_alone() -> Result<()> {
    let env = env(Version::V17, RegProxyOptions::default()).await?;
    let state = tempfile::tempdir()?;
    let images = env.images(state.path())?;
    let img = pushed(&env, "team/served", &TestImage::small()?).await?;
    let other = pushed(&env, "team/sandbox", &TestImage::random(&[MIB])?).await?;
    let r = Reference::parse(&img.reference_via(&env.registry.host()))?;
    let cancel = CancellationToken::new();
    images.want(&r, "config")?;
    images.ensure(&r, &cancel).await.with_context(|| env.ctrd.log_text())?;
    let rt = env.runtime()?;
    let st = rt.image_status(&r.to_string()).await?.context("image missing")?;
    ensure!(st.pinned, "CRI does not report the kept image pinned on containerd 1.7");
    ensure!(images.pinning_available() == Some(true), "pinning_available: {:?}", images.pinning_available());
    // Durable: a new manager reads what is wanted and why.
    let json = std::fs::read_to_string(state.path().join("images.json"))?;
    ensure!(json.contains(&r.to_string()) && json.contains("config"), "{json}");

    // Someone else's pin (as containerd pins the sandbox image): Hearth wants it, then lets go.
    let o = other.reference_via(&env.registry.host());
    rt.pull(&o, None).await?;
    env.ctrd.ctr(&["images", "label", &o, &format!("{PIN_LABEL}=pinned")])?;
    let or = Reference::parse(&o)?;
    images.want(&or, "controller")?;
    images.ensure(&or, &cancel).await?;
    images.release("controller").await?;
    let labels = env.ctrd.ctr(&["images", "ls"])?;
    ensure!(rt.image_status(&o).await?.context("sandbox-like image gone")?.pinned, "another's pin was removed:\n{labels}");

    images.release("config").await?;
    unpinned(&rt, &r.to_string()).await.context("still pinned after release")?;
    let records = rt.image_records().await?;
    ensure!(
        records.iter().all(|i| !i.labels.contains_key(HEARTH_PIN_LABEL)),
        "Hearth's label left behind: {:?}",
        records.iter().map(|i| (&i.name, &i.labels)).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn on_16_pinning_is_unavailable_and_a_removed_wanted_image_is_pulled_again() -> Result<()> {
    let env = env(Version::V16, RegProxyOptions::default()).await?;
    let state = tempfile::tempdir()?;
    let images = env.images(state.path())?;
    let img = pushed(&env, "team/kept", &TestImage::small()?).await?;
    let r = Reference::parse(&img.reference_via(&env.registry.host()))?;
    let cancel = CancellationToken::new();
    images.want(&r, "config")?;
    images.ensure(&r, &cancel).await?;
    ensure!(images.pinning_available() == Some(false), "containerd 1.6 ignores the label; got {:?}", images.pinning_available());
    // The kubelet's image GC removes it anyway; the next check pulls it again.
    let rt = env.runtime()?;
    rt.remove(&r.to_string()).await?;
    ensure!(rt.image_status(&r.to_string()).await?.is_none(), "RemoveImage left it");
    images.reconcile(&cancel).await;
    ensure!(rt.image_status(&r.to_string()).await?.is_some(), "the wanted image was not pulled again");
    Ok(())
}

#[tokio::test]
async fn token_auth_registry_with_credentials_and_without() -> Result<()> {
    let env = env(Version::V17, RegProxyOptions { token_auth: Some(("puller".into(), "s3cret".into())), ..Default::default() }).await?;
    let img = pushed(&env, "private/app", &TestImage::small()?).await?;
    let reference = img.reference_via(&env.proxy.host());
    let denied = pull(&env.puller(None, small_settings())?, &reference).await;
    ensure!(denied.is_err(), "an anonymous pull of a private image succeeded");
    let wrong = pull(&env.puller(Some(("puller", "nope")), small_settings())?, &reference).await;
    ensure!(wrong.is_err(), "wrong credentials pulled the image");
    let before = env.proxy.stats().token_requests;
    let p = pull(&env.puller(Some(("puller", "s3cret")), small_settings())?, &reference).await?;
    ensure!(p.path == PullPath::Mirror, "{p:?}");
    ensure!(env.proxy.stats().token_requests > before, "no token was fetched");
    Ok(())
}

#[tokio::test]
async fn a_manifest_list_resolves_to_this_platform() -> Result<()> {
    let env = env(Version::V17, RegProxyOptions::default()).await?;
    let img = pushed(&env, "multi/app", &TestImage::builder(&[2 * MIB, MIB]).multi_platform().build()?).await?;
    ensure!(img.index_digest.is_some(), "the test image has no index");
    let reference = img.reference_via(&env.proxy.host());
    let p = pull(&env.puller(None, small_settings())?, &reference).await?;
    ensure!(p.path == PullPath::Mirror, "{p:?}");
    let st = env.runtime()?.image_status(&reference).await?.context("missing")?;
    ensure!(st.id == img.config.digest, "CRI unpacked {} where this platform's config is {}", st.id, img.config.digest);
    ensure!(
        st.repo_digests.iter().any(|d| d.ends_with(img.index_digest.as_deref().unwrap_or_default())),
        "repo digests {:?} do not name the index",
        st.repo_digests
    );
    Ok(())
}

#[tokio::test]
async fn a_registry_that_refuses_ranges_falls_back_to_a_plain_cri_pull() -> Result<()> {
    let env = env(Version::V17, RegProxyOptions { refuse_ranges: true, ..Default::default() }).await?;
    let img = pushed(&env, "plain/app", &TestImage::small()?).await?;
    let reference = img.reference_via(&env.proxy.host());
    let p = pull(&env.puller(None, small_settings())?, &reference).await?;
    ensure!(p.path == PullPath::Fallback, "{p:?}");
    ensure!(p.fallback.as_ref().map(|f| f.0) == Some("range_refused"), "fallback reason: {:?}", p.fallback);
    ensure!(env.runtime()?.image_status(&reference).await?.is_some(), "the fallback pull did not land the image");
    Ok(())
}

async fn a_layer_whose_digest_does_not_match_is_never_committed(mode: Mode) -> Result<()> {
    let env = env(Version::V17, RegProxyOptions::default()).await?;
    let img = pushed(&env, "bad/app", &TestImage::small()?).await?;
    let bad = img.layers[1].digest.clone();
    env.proxy.corrupt_blob(&bad);
    let reference = img.reference_via(&env.proxy.host());
    let e = pull(&env.puller_via(mode, None, small_settings())?, &reference).await;
    // The fast path refuses the layer; the runtime's own pull then gets the same bad bytes.
    ensure!(e.is_err(), "a corrupt layer was pulled: {e:?}");
    ensure!(!env.content_has(&bad)?, "the corrupt layer is in the content store");
    let rt = env.runtime()?;
    ensure!(
        rt.ingests("").await?.iter().all(|(r, _)| !r.contains(&bad)),
        "the failed write was left to resume: {:?} ({e:?})",
        rt.ingests("").await?
    );
    ensure!(rt.image_status(&reference).await?.is_none(), "an image with a corrupt layer was created");
    // Once the registry serves the right bytes, the pull succeeds.
    env.proxy.heal_blob(&bad);
    let p = pull(&env.puller_via(mode, None, small_settings())?, &reference).await?;
    ensure!(p.path.is_fast(), "{p:?}");
    Ok(())
}

#[tokio::test]
async fn a_layer_whose_digest_does_not_match_is_never_committed_via_the_mirror() -> Result<()> {
    a_layer_whose_digest_does_not_match_is_never_committed(Mode::Mirror).await
}

#[tokio::test]
async fn a_layer_whose_digest_does_not_match_is_never_committed_via_the_content_api() -> Result<()> {
    a_layer_whose_digest_does_not_match_is_never_committed(Mode::Content).await
}

/// Blocking `ctr` calls and the proxy share the test's runtime: give them threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_containerd_restart_mid_pull_is_waited_out_and_the_pull_resumes() -> Result<()> {
    // Two capped connections: the 36 MiB image takes about 2 s, long enough to restart under it.
    let mut env = env(Version::V17, RegProxyOptions { per_connection_bytes_per_sec: Some(8 * MIB), ..Default::default() }).await?;
    let img = pushed(&env, "restart/app", &TestImage::random(&[12 * MIB, 12 * MIB, 12 * MIB])?).await?;
    let reference = img.reference_via(&env.proxy.host());
    let puller = env.puller(None, PullSettings { connections: 2, chunk: 2 * MIB, direct_above: 0, ..Default::default() })?;
    let progress = Arc::new(Progress::default());
    let task = {
        let (progress, r) = (progress.clone(), Reference::parse(&reference)?);
        tokio::spawn(async move { puller.pull(&r, &progress, &CancellationToken::new()).await })
    };
    hearth_tests::wait_for("a third of the image written", Duration::from_secs(20), || {
        let done = progress.done.load(std::sync::atomic::Ordering::Relaxed);
        async move { Ok((done >= 12 * MIB).then_some(())) }
    })
    .await?;
    env.ctrd.restart(Duration::from_millis(1500)).await?;
    env.proxy.set_per_connection_bytes_per_sec(None);
    let p = tokio::time::timeout(Duration::from_secs(60), task).await.context("the pull did not end after the restart")??;
    let p = p.with_context(|| env.ctrd.log_text())?;
    ensure!(p.path == PullPath::Mirror, "expected the fast path to survive the restart: {p:?}");
    ensure!(p.reused >= 8 * MIB, "resumed only {} bytes from the content store: {p:?}", p.reused);
    ensure!(env.runtime()?.image_status(&reference).await?.is_some(), "no image after the restart");
    Ok(())
}

#[tokio::test]
async fn a_full_disk_fails_the_pull_clearly_and_gives_the_space_back() -> Result<()> {
    let registry = Registry::start().await?;
    let opts = Options::default()
        .namespace("k8s.io")
        .with_cri(CriOptions::new(&format!("{}/pause:3.9", registry.host())))
        .binaries(&containerd_17_dir()?)
        .root_bytes(24 * MIB);
    let ctrd = Containerd::start(opts).await?;
    let proxy = RegProxy::start(registry.addr(), RegProxyOptions::default()).await?;
    let env = Env { ctrd, registry, proxy, _dir: tempfile::tempdir()? };
    let big = pushed(&env, "full/big", &TestImage::random(&[10 * MIB, 10 * MIB, 10 * MIB])?).await?;
    let e = pull(&env.puller(None, small_settings())?, &big.reference_via(&env.proxy.host())).await;
    match &e {
        Err(PullError::DiskFull(msg)) => ensure!(msg.contains("no space left on device"), "{msg}"),
        other => anyhow::bail!("expected a disk-full error, got {other:?}"),
    }
    let rt = env.runtime()?;
    ensure!(rt.ingests("").await?.is_empty(), "unfinished writes left on a full disk: {:?}", rt.ingests("").await?);
    ensure!(rt.image_status(&big.reference_via(&env.proxy.host())).await?.is_none(), "an image was created");
    // Nothing is wedged: an image that fits pulls.
    let small = pushed(&env, "full/small", &TestImage::random(&[MIB])?).await?;
    let p = pull(&env.puller(None, small_settings())?, &small.reference_via(&env.proxy.host())).await?;
    ensure!(p.path == PullPath::Mirror, "{p:?}");
    Ok(())
}

#[tokio::test]
async fn a_models_new_image_replaces_its_old_one_in_what_is_kept() -> Result<()> {
    let env = env(Version::V17, RegProxyOptions::default()).await?;
    let state = tempfile::tempdir()?;
    let images = env.images(state.path())?;
    let v1 = pushed(&env, "engine/v1", &TestImage::random(&[MIB])?).await?;
    let v2 = pushed(&env, "engine/v2", &TestImage::random(&[MIB])?).await?;
    let (r1, r2) = (Reference::parse(&v1.reference)?, Reference::parse(&v2.reference)?);
    let cancel = CancellationToken::new();
    images.prefetch(&r1, Some("llama-abc"), &cancel).await?;
    let rt = env.runtime()?;
    ensure!(rt.image_status(&v1.reference).await?.context("v1 missing")?.pinned, "v1 not pinned");
    images.prefetch(&r2, Some("llama-abc"), &cancel).await?;
    ensure!(rt.image_status(&v2.reference).await?.context("v2 missing")?.pinned, "v2 not pinned");
    unpinned(&rt, &v1.reference).await.context("the model's old image is still kept")?;
    ensure!(!images.wanted().contains_key(&v1.reference), "{:?}", images.wanted());
    Ok(())
}
