//! `hearth local`'s sample network workload: two stand-in pods (a "model server" and a
//! client calling it twice a second), each a child process in its own cgroup under a
//! cgroup `hearth local` creates, so per-pod network metrics show something real without a
//! cluster. Needs root (cgroup and BPF); without it local mode says why and goes on.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pods::PodRef;

pub const NAMESPACE: &str = "hearth-local";

/// The two roles, run by the hidden `hearth __sample-net` subcommand.
pub fn serve(addr: SocketAddr) -> std::io::Result<()> {
    wait_for_go()?;
    let l = TcpListener::bind(addr)?;
    // Tells `SampleWorkload::start` the port is open (and which, for port 0), so the
    // client's first call lands.
    println!("listening {}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let mut req = [0u8; 256];
        if c.read(&mut req).is_ok() {
            // A "completion": a few KiB back per request.
            let _ = c.write_all(&[b'x'; 4096]);
        }
    }
    Ok(())
}

pub fn client(addr: SocketAddr) -> std::io::Result<()> {
    wait_for_go()?;
    loop {
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = c.write_all(b"POST /v1/completions {\"prompt\": \"hello\"}");
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Children start only once moved into their cgroup, so every socket they open is the pod's.
fn wait_for_go() -> std::io::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

/// The running sample: its cgroups and processes, removed on drop.
#[derive(Debug)]
pub struct SampleWorkload {
    root: PathBuf,
    children: Vec<std::process::Child>,
    pub pods: HashMap<String, PodRef>,
    pub port: u16,
}

impl SampleWorkload {
    /// Creates `<cgroup2 mount>/hearth-local-<pid>/pod<uid>` for each pod and starts the
    /// server and the client in them (the server on 127.0.0.1:`port`; 0 picks a free port,
    /// which `port` then holds).
    pub fn start(port: u16) -> Result<Self, String> {
        let mount = super::cgroup2_mount().ok_or("no cgroup v2 mount")?;
        let root = mount.join(format!("hearth-local-{}", std::process::id()));
        std::fs::create_dir_all(&root).map_err(|e| format!("creating cgroup {}: {e}", root.display()))?;
        let mut w = Self { root, children: Vec::new(), pods: HashMap::new(), port };
        let mut addr = format!("127.0.0.1:{port}");
        let exe = std::env::current_exe().map_err(|e| format!("finding the hearth binary: {e}"))?;
        for (i, (name, role)) in [("sample-model-server", "server"), ("sample-client", "client")].into_iter().enumerate() {
            let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), i + 1);
            let dir = w.root.join(format!("pod{uid}"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating cgroup {}: {e}", dir.display()))?;
            let mut child = std::process::Command::new(&exe)
                .args(["__sample-net", role, &addr])
                .stdin(std::process::Stdio::piped())
                .stdout(if role == "server" { std::process::Stdio::piped() } else { std::process::Stdio::null() })
                .spawn()
                .map_err(|e| format!("starting the sample {role}: {e}"))?;
            let moved = std::fs::write(dir.join("cgroup.procs"), child.id().to_string());
            let go = child.stdin.take().map(|mut s| s.write_all(b"go\n"));
            let listening = child.stdout.take().map(|out| {
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).map(|_| line)
            });
            w.children.push(child);
            moved.map_err(|e| format!("moving the sample {role} into {}: {e}", dir.display()))?;
            if let Some(Err(e)) = go {
                return Err(format!("starting the sample {role}: {e}"));
            }
            if let Some(l) = listening {
                let bound = l.as_deref().ok().and_then(|s| s.trim().strip_prefix("listening ")).and_then(|p| p.parse::<u16>().ok());
                let Some(bound) = bound else {
                    let said = match l {
                        Ok(s) if s.trim().is_empty() => "it exited without a word".to_owned(),
                        Ok(s) => format!("it said {:?}", s.trim()),
                        Err(e) => e.to_string(),
                    };
                    return Err(format!("the sample server did not start listening on {addr}: {said}"));
                };
                w.port = bound;
                addr = format!("127.0.0.1:{bound}");
            }
            w.pods.insert(uid, PodRef { namespace: NAMESPACE.into(), name: name.into() });
        }
        Ok(w)
    }

    /// The cgroup to attach at.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for SampleWorkload {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(dirs) = std::fs::read_dir(&self.root) {
            for d in dirs.flatten().filter(|d| d.path().is_dir()) {
                let _ = std::fs::remove_dir(d.path());
            }
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}
