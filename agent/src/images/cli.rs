//! `hearth images pull` and `hearth images ls`: the same pull the agent runs, against the
//! node's containerd directly (run as root on the node, or with its socket), and the images
//! the runtime has with who keeps them. Also the reader of Docker's `config.json` auths that
//! the agent's `images.auth_file` takes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::pull::{Progress, PullSettings, Puller};
use super::reference::Reference;
use super::registry::{Credentials, RegistryClient};
use super::runtime::{HEARTH_PIN_LABEL, PIN_LABEL, Runtime};

/// Docker's config.json `auths` by registry as references write it (`docker.io`,
/// `host:port`); keys may be URLs (`https://index.docker.io/v1/`).
pub fn docker_auths(text: &[u8]) -> Result<HashMap<String, Credentials>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        identitytoken: Option<String>,
    }
    let f: File = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (key, e) in f.auths {
        let host = key.trim_start_matches("https://").trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        let host = match host {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
            h => h,
        };
        let creds = match (e.auth, e.username, e.password, e.identitytoken) {
            (Some(a), _, _, _) if !a.is_empty() => {
                use base64::Engine as _;
                let raw =
                    base64::engine::general_purpose::STANDARD.decode(a.trim()).map_err(|e| format!("{key}: auth is not base64: {e}"))?;
                let raw = String::from_utf8(raw).map_err(|_| format!("{key}: auth is not UTF-8"))?;
                let (u, p) = raw.split_once(':').ok_or_else(|| format!("{key}: auth is not user:password"))?;
                Credentials { username: u.into(), password: p.into() }
            }
            (_, Some(u), Some(p), _) => Credentials { username: u, password: p },
            (_, _, _, Some(t)) => Credentials { username: "<token>".into(), password: t },
            _ => return Err(format!("{key}: neither auth nor username/password")),
        };
        out.insert(host.to_owned(), creds);
    }
    Ok(out)
}

pub struct PullArgs {
    pub reference: String,
    pub socket: PathBuf,
    pub namespace: String,
    pub auth_file: Option<PathBuf>,
    pub insecure: Vec<String>,
    /// 0: a plain CRI pull.
    pub connections: usize,
    pub chunk: u64,
    /// See `PullSettings::direct_above`.
    pub direct_above: u64,
    /// containerd's registry host directory, for the mirror; None: the content path.
    pub hosts_dir: Option<PathBuf>,
    pub progress: bool,
}

pub async fn pull(a: PullArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let r = Reference::parse(&a.reference)?;
    let creds = match &a.auth_file {
        Some(p) => docker_auths(&std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
            .map_err(|e| anyhow::anyhow!("{}: expected Docker config.json with \"auths\": {e}", p.display()))?,
        None => HashMap::new(),
    };
    let runtime = Runtime::new(&a.socket, &a.namespace, Duration::from_secs(30))?;
    let version = runtime.version().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let settings = PullSettings {
        connections: a.connections.max(1),
        chunk: a.chunk,
        fast: a.connections > 0,
        direct_above: a.direct_above,
        ..Default::default()
    };
    let registry = Arc::new(RegistryClient::new(creds, a.insecure)?);
    let mirror = match &a.hosts_dir {
        Some(dir) if settings.fast => {
            let m = super::MirrorSettings { hosts_dir: dir.clone(), listen: ([127, 0, 0, 1], 0).into(), address: None };
            Some(Arc::new(m.start(registry.clone(), &settings, None).map_err(|e| anyhow::anyhow!("{e}"))?))
        }
        _ => None,
    };
    let puller = Puller { registry, runtime, settings, limit: None, mirror };
    let progress = Arc::new(Progress::default());
    let bar = crate::prefetch::bytes_bar(a.progress);
    let ticker = {
        let (bar, p) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                bar.set_length(p.total.load(Ordering::Relaxed));
                bar.set_position(p.done.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "layers {}/{} {}",
                    p.layers_done.load(Ordering::Relaxed),
                    p.layers_total.load(Ordering::Relaxed),
                    p.phase_name()
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let result = puller.pull(&r, &progress, &cancel).await;
    ticker.abort();
    bar.finish_and_clear();
    let p = result?;
    let secs = p.elapsed.as_secs_f64();
    println!(
        "{r}: {} in {secs:.2}s via {} (containerd {version}): fetched {}, already in the content store {}{}",
        crate::prefetch::human(p.total as f64),
        p.path.as_str(),
        crate::prefetch::human(p.fetched as f64),
        crate::prefetch::human(p.reused as f64),
        p.fallback.map(|(reason, msg)| format!("; fell back ({reason}): {msg}")).unwrap_or_default(),
    );
    println!("image id {}", p.image_id);
    Ok(())
}

#[derive(Serialize)]
struct Row {
    reference: String,
    id: String,
    size: u64,
    /// "hearth", "other" (someone else's pin, e.g. the sandbox image), or "no".
    pinned_by: &'static str,
    /// Whether CRI reports it pinned (containerd 1.6 never does).
    cri_pinned: bool,
}

pub async fn ls(socket: PathBuf, namespace: String, json: bool) -> anyhow::Result<()> {
    let runtime = Runtime::new(&socket, &namespace, Duration::from_secs(30))?;
    let images = runtime.list_images().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let records = runtime.image_records().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut rows = Vec::new();
    for img in images {
        let names: Vec<&String> = img.repo_tags.iter().chain(&img.repo_digests).collect();
        let labels = records.iter().filter(|r| names.contains(&&r.name)).flat_map(|r| r.labels.keys()).collect::<Vec<_>>();
        let pinned_by = if labels.iter().any(|k| *k == HEARTH_PIN_LABEL) {
            "hearth"
        } else if labels.iter().any(|k| *k == PIN_LABEL) {
            "other"
        } else {
            "no"
        };
        let reference = img.repo_tags.first().or(img.repo_digests.first()).cloned().unwrap_or_else(|| "<none>".into());
        rows.push(Row { reference, id: img.id, size: img.size, pinned_by, cri_pinned: img.pinned });
    }
    rows.sort_by(|a, b| a.reference.cmp(&b.reference));
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let w = rows.iter().map(|r| r.reference.len()).max().unwrap_or(9).max(9);
    println!("{:<w$}  {:<19}  {:>10}  {:<9}  CRI-PINNED", "REFERENCE", "ID", "SIZE", "PINNED-BY");
    for r in rows {
        let id = r.id.strip_prefix("sha256:").unwrap_or(&r.id);
        println!(
            "{:<w$}  {:<19}  {:>10}  {:<9}  {}",
            r.reference,
            &id[..id.len().min(19)],
            crate::prefetch::human(r.size as f64),
            r.pinned_by,
            if r.cri_pinned { "yes" } else { "no" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auths_normalize_hosts_and_decode() {
        let f = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#;
        let a = docker_auths(f).unwrap();
        assert_eq!(a["docker.io"], Credentials { username: "u".into(), password: "p".into() });
        assert_eq!(a["127.0.0.1:5000"].username, "a");
        assert!(docker_auths(br#"{"auths":{"x":{"auth":"!!"}}}"#).unwrap_err().contains("base64"));
        assert!(docker_auths(br#"{"auths":{"x":{}}}"#).unwrap_err().contains("neither"));
        assert!(docker_auths(b"nope").is_err());
    }
}
