#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The BPF traffic counters on the real kernel, as root: two network namespaces joined by a
//! veth pair, a sender and a receiver each in its own test cgroup (standing in for pods),
//! the programs attached once at their parent with AllowMultiple. Processes enter the
//! namespaces with `nsenter --net=...` (not `ip netns exec`, which remounts /sys and hides
//! the cgroup tree). Without root these tests fail, saying so.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use hearth_agent::netobs::{self, EGRESS, INGRESS, NetObs, PeerClass};

fn require_root() -> Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "this test loads BPF programs and creates network namespaces: run it as root (scripts/test.sh does in CI)"
    );
    Ok(())
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Two namespaces, `a` (10.99.N.1) and `b` (10.99.N.2), joined by a veth pair; removed on drop.
struct NetPair {
    a: String,
    b: String,
    b_addr: String,
}

impl NetPair {
    fn new(tag: u32) -> Result<Self> {
        let (a, b) = (format!("hta{tag}"), format!("htb{tag}"));
        let net = tag % 250 + 1;
        let p = Self { a: a.clone(), b: b.clone(), b_addr: format!("10.99.{net}.2") };
        sh(&["ip", "netns", "add", &a])?;
        sh(&["ip", "netns", "add", &b])?;
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        sh(&["ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b])?;
        for (ns, dev, addr) in [(&a, &va, format!("10.99.{net}.1/24")), (&b, &vb, format!("10.99.{net}.2/24"))] {
            sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        // Static neighbours both ways: no ARP exchange to queue (and drop) the first packets.
        let mac = |ns: &str, dev: &str| -> Result<String> {
            let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", dev]).output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).map(str::to_owned).context("no MAC")
        };
        let (mac_a, mac_b) = (mac(&a, &va)?, mac(&b, &vb)?);
        sh(&["ip", "-n", &a, "neigh", "replace", &p.b_addr, "lladdr", &mac_b, "dev", &va, "nud", "permanent"])?;
        sh(&["ip", "-n", &b, "neigh", "replace", &format!("10.99.{net}.1"), "lladdr", &mac_a, "dev", &vb, "nud", "permanent"])?;
        Ok(p)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// A test cgroup under the cgroup v2 mount; processes left in it are killed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self(path))
    }
    fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).with_context(|| format!("moving {pid} into {}", self.0.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Starts `python3 -c script` in namespace `ns`, moves it into `cg`, then lets it go (it
/// waits for a line on stdin, so every socket it makes belongs to the cgroup).
fn spawn_in(ns: &str, cg: &Cgroup, script: &str, args: &[&str]) -> Result<Child> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["python3", "-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("nsenter")?;
    cg.add(child.id())?;
    writeln!(child.stdin.as_mut().context("stdin")?, "go")?;
    Ok(child)
}

const RECEIVER: &str = r#"
import socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1)
print("ready", flush=True)
s.settimeout(60)
c, _ = s.accept()
c.settimeout(60)
n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
print(n, flush=True)
"#;

const SENDER: &str = r#"
import socket, sys
sys.stdin.readline()
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 5001))
s.sendall(b"x" * n)
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"#;

fn line(child: &mut Child) -> Result<String> {
    let mut l = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut l)?;
    Ok(l.trim().to_owned())
}

fn test_root(tag: u32) -> Result<PathBuf> {
    let Some(root) = netobs::cgroup2_mount() else { bail!("no cgroup v2 mount found in /proc/self/mountinfo") };
    Ok(root.join(format!("hearth-test-{tag}")))
}

#[test]
fn tcp_payload_is_counted_exactly_on_both_ends_and_classified_by_peer() -> Result<()> {
    require_root()?;
    let tag = std::process::id() % 100_000;
    let base = test_root(tag)?;
    // Children first in drop order: declare the parent first.
    let parent = Cgroup::new(base.clone())?;
    let (a, b) = (Cgroup::new(base.join("sender"))?, Cgroup::new(base.join("receiver"))?);
    let net = NetPair::new(tag)?;
    // Only the receiver's address is in the class: the two ends must classify differently.
    let obs = NetObs::attach(&parent.0, &[PeerClass::parse("pods", &[&format!("{}/32", net.b_addr)]).unwrap()])?;

    const N: u64 = 10 * 1024 * 1024 + 1;
    let mut rx = spawn_in(&net.b, &b, RECEIVER, &[&net.b_addr])?;
    ensure!(line(&mut rx)? == "ready", "receiver did not start");
    let mut tx = spawn_in(&net.a, &a, SENDER, &[&net.b_addr, &N.to_string()])?;
    let got: u64 = line(&mut rx)?.parse()?;
    ensure!(tx.wait()?.success() && rx.wait()?.success(), "sender or receiver failed");
    assert_eq!(got, N, "the receiver read what was sent");

    let (ida, idb) = (netobs::cgroup_id(&a.0)?, netobs::cgroup_id(&b.0)?);
    let traffic = obs.traffic()?;
    let find = |id: u64, dir: u8| traffic.iter().filter(|(k, _)| k.cgroup_id == id && k.direction == dir).collect::<Vec<_>>();
    let sent = find(ida, EGRESS);
    let received = find(idb, INGRESS);
    // One series each way: the SYN and SYN-ACK of the listening socket (no peer on the
    // socket) classify by header into the same class as the connection.
    ensure!(sent.len() == 1 && received.len() == 1, "one series each way: {traffic:?}");
    assert_eq!(sent[0].1.payload_bytes, N, "sender egress payload");
    assert_eq!(received[0].1.payload_bytes, N, "receiver ingress payload");
    // The sender's peer (the receiver's address) is in the "pods" class; the receiver's
    // peer (10.99.x.1) is not, so it counts as "internet".
    assert_eq!(obs.class_name(sent[0].0.peer_class), "pods");
    assert_eq!(obs.class_name(received[0].0.peer_class), "internet");
    assert!(sent[0].1.bytes > N && sent[0].1.packets > 0, "{:?}", sent[0].1);
    // ACKs flow back with no payload.
    let acks = find(idb, EGRESS);
    assert!(acks.len() == 1 && acks[0].1.payload_bytes == 0 && acks[0].1.packets > 0, "{acks:?}");
    assert_eq!(obs.errors()?, (0, 0));
    Ok(())
}

const UDP_RECEIVER: &str = r#"
import socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no drops at the socket
s.settimeout(20)
s.bind((sys.argv[1], 5002))
print("ready", flush=True)
k = int(sys.argv[2]); got = 0; n = 0
while got < k:
    b = s.recv(65536); got += 1; n += len(b)
print(n, flush=True)
"#;

const UDP_SENDER: &str = r#"
import socket, sys
sys.stdin.readline()
k, size = int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(k):
    s.sendto(b"u" * size, (sys.argv[1], 5002))
"#;

#[test]
fn udp_datagrams_count_one_packet_each_with_ip_and_udp_headers() -> Result<()> {
    require_root()?;
    let tag = std::process::id() % 100_000 + 100_000;
    let base = test_root(tag)?;
    let parent = Cgroup::new(base.clone())?;
    let (a, b) = (Cgroup::new(base.join("sender"))?, Cgroup::new(base.join("receiver"))?);
    let net = NetPair::new(tag)?;
    let obs = NetObs::attach(&parent.0, &[])?;
    // Plain sendto of small datagrams: no UDP GSO on send, no UDP GRO on this receiver.
    let (k, size) = (200u64, 1000u64);
    let mut rx = spawn_in(&net.b, &b, UDP_RECEIVER, &[&net.b_addr, &k.to_string()])?;
    ensure!(line(&mut rx)? == "ready", "receiver did not start");
    let mut tx = spawn_in(&net.a, &a, UDP_SENDER, &[&net.b_addr, &k.to_string(), &size.to_string()])?;
    ensure!(tx.wait()?.success(), "sender failed");
    let got: u64 = line(&mut rx)?.parse()?;
    ensure!(rx.wait()?.success(), "receiver failed");
    assert_eq!(got, k * size);
    let (ida, idb) = (netobs::cgroup_id(&a.0)?, netobs::cgroup_id(&b.0)?);
    let traffic = obs.traffic()?;
    let one = |id: u64, dir: u8| {
        let v: Vec<_> = traffic.iter().filter(|(key, _)| key.cgroup_id == id && key.direction == dir).map(|(_, v)| *v).collect();
        assert_eq!(v.len(), 1, "{traffic:?}");
        v[0]
    };
    for v in [one(ida, EGRESS), one(idb, INGRESS)] {
        assert_eq!(v.packets, k, "{v:?}");
        assert_eq!(v.bytes, k * (size + 28), "IPv4 (20) + UDP (8) headers per datagram: {v:?}");
        assert_eq!(v.payload_bytes, k * size, "{v:?}");
    }
    Ok(())
}

#[test]
fn a_process_in_the_host_network_namespace_is_still_attributed_by_cgroup() -> Result<()> {
    require_root()?;
    let tag = std::process::id() % 100_000 + 200_000;
    let base = test_root(tag)?;
    let parent = Cgroup::new(base.clone())?;
    let (a, b) = (Cgroup::new(base.join("hostnet-client"))?, Cgroup::new(base.join("hostnet-server"))?);
    let obs = NetObs::attach(&parent.0, &[PeerClass::parse("loopback", &["127.0.0.0/8"]).unwrap()])?;
    // No namespace switch: both run in the host's network namespace, like hostNetwork pods.
    let spawn_host = |cg: &Cgroup, script: &str, args: &[&str]| -> Result<Child> {
        let mut child = Command::new("python3").args(["-c", script]).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        cg.add(child.id())?;
        writeln!(child.stdin.as_mut().context("stdin")?, "go")?;
        Ok(child)
    };
    let port = 20000 + (tag % 20000);
    let recv = RECEIVER.replace("5001", &port.to_string());
    let send = SENDER.replace("5001", &port.to_string());
    const N: u64 = 3 * 1024 * 1024 + 7;
    let mut rx = spawn_host(&b, &recv, &["127.0.0.1"])?;
    ensure!(line(&mut rx)? == "ready", "receiver did not start");
    let mut tx = spawn_host(&a, &send, &["127.0.0.1", &N.to_string()])?;
    let got: u64 = line(&mut rx)?.parse()?;
    ensure!(tx.wait()?.success() && rx.wait()?.success(), "sender or receiver failed");
    assert_eq!(got, N);
    let (ida, idb) = (netobs::cgroup_id(&a.0)?, netobs::cgroup_id(&b.0)?);
    let traffic = obs.traffic()?;
    let sent: u64 = traffic.iter().filter(|(k, _)| k.cgroup_id == ida && k.direction == EGRESS).map(|(_, v)| v.payload_bytes).sum();
    let received: u64 = traffic.iter().filter(|(k, _)| k.cgroup_id == idb && k.direction == INGRESS).map(|(_, v)| v.payload_bytes).sum();
    assert_eq!((sent, received), (N, N), "{traffic:?}");
    assert!(traffic.iter().filter(|(k, _)| k.cgroup_id == ida).all(|(k, _)| obs.class_name(k.peer_class) == "loopback"), "{traffic:?}");
    Ok(())
}
