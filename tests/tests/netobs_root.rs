#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The BPF traffic counters on the real kernel, as root: two network namespaces joined by a
//! veth pair, a sender and a receiver each in its own test cgroup (standing in for pods),
//! the programs attached once at their parent with AllowMultiple. Processes enter the
//! namespaces with `nsenter --net=...` (not `ip netns exec`, which remounts /sys and hides
//! the cgroup tree). Without root these tests fail, saying so.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use hearth_agent::netobs::{self, EGRESS, Family, INGRESS, NetObs, PeerClass, ROLE_CLIENT, ROLE_SERVER};
use hearth_tests::sh;

fn require_root() -> Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "this test loads BPF programs and creates network namespaces: run it as root (scripts/test.sh does in CI)"
    );
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
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).args(["python3", "-c", script]).args(args);
    start_in(cmd, cg)
}

/// Like [`spawn_in`] without a namespace switch.
fn spawn_in_host(cg: &Cgroup, script: &str, args: &[&str]) -> Result<Child> {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).args(args);
    start_in(cmd, cg)
}

fn start_in(mut cmd: Command, cg: &Cgroup) -> Result<Child> {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("starting python3")?;
    cg.add(child.id())?;
    writeln!(child.stdin.as_mut().context("stdin")?, "go")?;
    Ok(child)
}

/// Binds port 5001 (in a namespace of the test's own; on the host the test replaces it with
/// 0 so the kernel picks one) and prints the port, then listens once told (see `listening`
/// and `listen_now`) and says "ready"; then prints how many bytes it received.
const RECEIVER: &str = r#"
import socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001))
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
s.listen(1)
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

/// Prints the kernel's tcpi_bytes_sent and tcpi_bytes_retrans (struct tcp_info offsets 200
/// and 208) once the receiver has everything.
const SENDER: &str = r#"
import socket, struct, sys
sys.stdin.readline()
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 5001))
s.sendall(b"x" * n)
s.shutdown(socket.SHUT_WR)
s.recv(1)
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
print(*struct.unpack_from("QQ", info, 200), flush=True)
s.close()
"#;

fn line(child: &mut Child) -> Result<String> {
    let mut l = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut l)?;
    Ok(l.trim().to_owned())
}

/// The port a RECEIVER bound.
fn bound_port(rx: &mut Child) -> Result<u16> {
    let l = line(rx)?;
    l.parse().with_context(|| format!("receiver did not bind: {l:?}"))
}

/// Tells a RECEIVER that has bound to listen, once whatever must see its listen() (the
/// sock_ops program marks listeners there) is attached.
fn listen_now(rx: &mut Child) -> Result<()> {
    writeln!(rx.stdin.as_mut().context("stdin")?, "listen")?;
    ensure!(line(rx)? == "ready", "receiver did not start listening");
    Ok(())
}

/// A RECEIVER that binds and listens straight away: its port.
fn listening(rx: &mut Child) -> Result<u16> {
    let port = bound_port(rx)?;
    listen_now(rx)?;
    Ok(port)
}

/// The SENDER's last line: (tcpi_bytes_sent, tcpi_bytes_retrans), checked for consistency.
fn tcp_info_line(tx: &mut Child) -> Result<(u64, u64)> {
    let info = line(tx)?;
    let (a, b) = info.split_once(' ').with_context(|| format!("tcp_info line {info:?}"))?;
    let (sent, retrans): (u64, u64) = (a.parse()?, b.parse()?);
    ensure!(sent >= retrans, "tcp_info: sent {sent} < retransmitted {retrans}");
    Ok((sent, retrans))
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
    let obs = NetObs::attach(&parent.0, &[PeerClass::parse("pods", &[&format!("{}/32", net.b_addr)]).unwrap()], &[5001])?;
    assert_eq!(obs.family(Family::Traffic), Ok(()));
    assert_eq!(obs.family(Family::Tcp), Ok(()));

    const N: u64 = 10 * 1024 * 1024 + 1;
    let mut rx = spawn_in(&net.b, &b, RECEIVER, &[&net.b_addr])?;
    listening(&mut rx)?;
    let mut tx = spawn_in(&net.a, &a, SENDER, &[&net.b_addr, &N.to_string()])?;
    let got: u64 = line(&mut rx)?.parse()?;
    let (bytes_sent, bytes_retrans) = tcp_info_line(&mut tx)?;
    ensure!(tx.wait()?.success() && rx.wait()?.success(), "sender or receiver failed");
    assert_eq!(got, N, "the receiver read what was sent");
    assert_eq!(bytes_sent, N + bytes_retrans, "tcp_info: sent = payload + retransmitted");

    let (ida, idb) = (netobs::cgroup_id(&a.0)?, netobs::cgroup_id(&b.0)?);
    let traffic = obs.traffic()?;
    let find = |id: u64, dir: u8| traffic.iter().filter(|(k, _)| k.cgroup_id == id && k.direction == dir).collect::<Vec<_>>();
    let sent = find(ida, EGRESS);
    let received = find(idb, INGRESS);
    // One series each way: the SYN and SYN-ACK of the listening socket (no peer on the
    // socket) classify by header into the same class as the connection.
    ensure!(sent.len() == 1 && received.len() == 1, "one series each way: {traffic:?}");
    // Exactly what the sender's TCP put on the wire, retransmissions included (a loaded CI
    // machine can drop on veth); the receiver exactly N unless some retransmission was a
    // duplicate of something that had arrived.
    assert_eq!(sent[0].1.payload_bytes, bytes_sent, "sender egress payload = tcpi_bytes_sent");
    if bytes_retrans == 0 {
        assert_eq!(received[0].1.payload_bytes, N, "receiver ingress payload");
    } else {
        assert!((N..=N + bytes_retrans).contains(&received[0].1.payload_bytes), "receiver ingress payload {:?}", received[0].1);
    }
    // The sender's peer (the receiver's address) is in the "pods" class; the receiver's
    // peer (10.99.x.1) is not, so it counts as "internet".
    assert_eq!(obs.class_name(sent[0].0.peer_class), "pods");
    assert_eq!(obs.class_name(received[0].0.peer_class), "internet");
    assert!(sent[0].1.bytes > N && sent[0].1.packets > 0, "{:?}", sent[0].1);
    // ACKs flow back with no payload.
    let acks = find(idb, EGRESS);
    assert!(acks.len() == 1 && acks[0].1.payload_bytes == 0 && acks[0].1.packets > 0, "{acks:?}");
    let errors = obs.errors()?;
    assert_eq!((errors.no_cgroup_packets, errors.traffic_full, errors.storage), (0, 0, 0), "{errors:?}");

    // TCP health: one connection each side, by role, and closed again.
    let tcp = obs.tcp()?;
    let conn = |id: u64, role: u8| {
        tcp.iter().find(|(k, _)| k.cgroup_id == id && k.role == role).map(|(k, v)| (obs.class_name(k.peer_class).to_owned(), *v))
    };
    let (class, client) = conn(ida, ROLE_CLIENT).context("sender's connection")?;
    assert_eq!((class.as_str(), client.established, client.failed, client.closed), ("pods", 1, 0, 1), "{tcp:?}");
    let (class, server) = conn(idb, ROLE_SERVER).context("receiver's connection")?;
    assert_eq!((class.as_str(), server.established, server.failed, server.closed), ("internet", 1, 0, 1), "{tcp:?}");
    ensure!(tcp.len() == 2, "no other TCP series: {tcp:?}");

    // Declared port 5001: the receiver's socket is on it both ways, so its traffic entries
    // carry the port (the handshake on the listener too) and the listener series are byte
    // for byte the receiver's traffic; the sender's ephemeral port is not labelled.
    assert_eq!((sent[0].0.port, received[0].0.port, acks[0].0.port), (0, 5001, 5001), "{traffic:?}");
    let listeners = obs.listeners()?;
    ensure!(listeners.iter().all(|(k, _)| k.cgroup_id == idb && k.port == 5001), "{listeners:?}");
    let lb = |dir: u8| listeners.iter().find(|(k, _)| k.direction == dir).map(|(_, v)| v.bytes);
    assert_eq!(lb(INGRESS), Some(received[0].1.bytes), "{listeners:?}");
    assert_eq!(lb(EGRESS), Some(acks[0].1.bytes), "{listeners:?}");
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
    let obs = NetObs::attach(&parent.0, &[], &[])?;
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
    let obs = NetObs::attach(&parent.0, &[PeerClass::parse("loopback", &["127.0.0.0/8"]).unwrap()], &[])?;
    // No namespace switch: both run in the host's network namespace, like hostNetwork pods,
    // so the receiver takes a port the kernel picks.
    const N: u64 = 3 * 1024 * 1024 + 7;
    let mut rx = spawn_in_host(&b, &RECEIVER.replace("5001", "0"), &["127.0.0.1"])?;
    let port = listening(&mut rx)?;
    let mut tx = spawn_in_host(&a, &SENDER.replace("5001", &port.to_string()), &["127.0.0.1", &N.to_string()])?;
    let got: u64 = line(&mut rx)?.parse()?;
    let (bytes_sent, bytes_retrans) = tcp_info_line(&mut tx)?;
    ensure!(tx.wait()?.success() && rx.wait()?.success(), "sender or receiver failed");
    assert_eq!(got, N);
    let (ida, idb) = (netobs::cgroup_id(&a.0)?, netobs::cgroup_id(&b.0)?);
    let traffic = obs.traffic()?;
    let sent: u64 = traffic.iter().filter(|(k, _)| k.cgroup_id == ida && k.direction == EGRESS).map(|(_, v)| v.payload_bytes).sum();
    let received: u64 = traffic.iter().filter(|(k, _)| k.cgroup_id == idb && k.direction == INGRESS).map(|(_, v)| v.payload_bytes).sum();
    assert_eq!(sent, bytes_sent, "sender egress payload = tcpi_bytes_sent: {traffic:?}");
    assert!(received >= N && received <= N + bytes_retrans, "receiver payload {received}, N {N}, retransmitted {bytes_retrans}");
    assert!(traffic.iter().filter(|(k, _)| k.cgroup_id == ida).all(|(k, _)| obs.class_name(k.peer_class) == "loopback"), "{traffic:?}");
    Ok(())
}

const CONNECTS: &str = r#"
import socket, sys
sys.stdin.readline()
for addr, port in [(sys.argv[1], 5009), (sys.argv[2], 5009)]:
    try:
        socket.create_connection((addr, port), timeout=1.0).close()
        print("connected", flush=True); sys.exit(1)
    except (ConnectionRefusedError, TimeoutError) as e:
        print(type(e).__name__, flush=True)
"#;

#[test]
fn a_refused_and_a_timed_out_connect_each_count_as_failed() -> Result<()> {
    require_root()?;
    let tag = std::process::id() % 100_000 + 300_000;
    let base = test_root(tag)?;
    let parent = Cgroup::new(base.clone())?;
    let client = Cgroup::new(base.join("client"))?;
    let net = NetPair::new(tag)?;
    let obs = NetObs::attach(&parent.0, &[], &[])?;
    // Nothing listens on b:5009 (RST); .3 is on the link with a neighbour entry but no host
    // (the SYN vanishes).
    let silent = format!("{}.3", net.b_addr.rsplit_once('.').context("an IPv4 address")?.0);
    sh(&["ip", "-n", &net.a, "neigh", "replace", &silent, "lladdr", "02:00:00:00:00:99", "dev", &format!("va{tag}"), "nud", "permanent"])?;
    let mut c = spawn_in(&net.a, &client, CONNECTS, &[&net.b_addr, &silent])?;
    assert_eq!(line(&mut c)?, "ConnectionRefusedError");
    assert_eq!(line(&mut c)?, "TimeoutError");
    ensure!(c.wait()?.success(), "client failed");
    let id = netobs::cgroup_id(&client.0)?;
    let tcp = obs.tcp()?;
    let mine: Vec<_> = tcp.iter().filter(|(k, _)| k.cgroup_id == id).collect();
    ensure!(mine.len() == 1 && mine[0].0.role == ROLE_CLIENT, "{tcp:?}");
    assert_eq!((mine[0].1.failed, mine[0].1.established), (2, 0), "{tcp:?}");
    Ok(())
}

/// A userspace stand-in for `tc netem` (this kernel has no sch_netem): two TUN devices, one
/// moved into each namespace, and a forwarder that delays every packet a->b by `delay_ms`
/// and drops every `drop_every`-th data-carrying packet a->b. The real kernel TCP stacks on
/// both ends see a lossy, slow path; nothing about the counting is simulated.
const IMPAIR: &str = r#"
import fcntl, heapq, os, select, struct, sys, time
TUNSETIFF = 0x400454ca
def tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))  # IFF_TUN | IFF_NO_PI
    return fd
a, b = tun(sys.argv[1]), tun(sys.argv[2])
delay, drop_every = float(sys.argv[3]) / 1000, int(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()
queue, seq, data = [], 0, 0
while True:
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, fd, pkt = heapq.heappop(queue)
        os.write(fd, pkt)
    timeout = max(0.0, queue[0][0] - now) if queue else 0.5
    ready, _, _ = select.select([a, b], [], [], timeout)
    for fd in ready:
        pkt = os.read(fd, 65536)
        if fd == a:
            ihl = (pkt[0] & 15) * 4
            if pkt[9] == 6 and len(pkt) > ihl + ((pkt[ihl + 12] >> 4) * 4):
                data += 1
                if drop_every and data % drop_every == 0:
                    continue
            seq += 1
            heapq.heappush(queue, (time.monotonic() + delay, seq, b, pkt))
        else:
            seq += 1
            heapq.heappush(queue, (time.monotonic(), seq, a, pkt))
"#;

/// Namespaces `a` (10.98.N.1) and `b` (10.98.N.2) joined through [`IMPAIR`].
struct ImpairedPair {
    a: String,
    b: String,
    b_addr: String,
    fwd: Child,
}

impl ImpairedPair {
    fn new(tag: u32, delay_ms: u32, drop_every: u32) -> Result<Self> {
        let (a, b) = (format!("hia{tag}"), format!("hib{tag}"));
        let net = tag % 250 + 1;
        sh(&["ip", "netns", "add", &a])?;
        sh(&["ip", "netns", "add", &b])?;
        let (ta, tb) = (format!("ta{tag}"), format!("tb{tag}"));
        let fwd = Command::new("python3")
            .args(["-c", IMPAIR, &ta, &tb, &delay_ms.to_string(), &drop_every.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let p = Self { a: a.clone(), b: b.clone(), b_addr: format!("10.98.{net}.2"), fwd };
        let mut fwd = p;
        ensure!(line(&mut fwd.fwd)? == "ready", "forwarder did not start");
        let (ia, ib) = (format!("10.98.{net}.1"), format!("10.98.{net}.2"));
        for (ns, dev, local, peer) in [(&a, &ta, &ia, &ib), (&b, &tb, &ib, &ia)] {
            sh(&["ip", "link", "set", dev, "netns", ns])?;
            sh(&["ip", "-n", ns, "addr", "add", local, "peer", peer, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        writeln!(fwd.fwd.stdin.as_mut().context("stdin")?, "go")?;
        Ok(fwd)
    }

    /// `nstat -az` counter in namespace `ns`.
    fn nstat(ns: &str, name: &str) -> Result<u64> {
        let out = Command::new("nsenter").arg(format!("--net=/run/netns/{ns}")).args(["nstat", "-az", "--json"]).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("nstat --json")?;
        v["kernel"][name].as_u64().with_context(|| format!("{name} in nstat output"))
    }
}

impl Drop for ImpairedPair {
    fn drop(&mut self) {
        let _ = self.fwd.kill();
        let _ = self.fwd.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// Sends argv[2] bytes, then says "sent" and keeps the connection open until told.
const HOLDING_SENDER: &str = r#"
import socket, sys
sys.stdin.readline()
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 5001))
s.sendall(b"x" * n)
print("sent", flush=True)
sys.stdin.readline()
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"#;

#[test]
fn retransmits_under_loss_match_the_kernels_own_count() -> Result<()> {
    require_root()?;
    let tag = std::process::id() % 100_000 + 400_000;
    let base = test_root(tag)?;
    let parent = Cgroup::new(base.clone())?;
    let (a, b) = (Cgroup::new(base.join("sender"))?, Cgroup::new(base.join("receiver"))?);
    let net = ImpairedPair::new(tag, 5, 25)?;
    let obs = NetObs::attach(&parent.0, &[], &[])?;
    let before = ImpairedPair::nstat(&net.a, "TcpRetransSegs")?;
    const N: u64 = 2 * 1024 * 1024;
    let mut rx = spawn_in(&net.b, &b, RECEIVER, &[&net.b_addr])?;
    listening(&mut rx)?;
    let mut tx = spawn_in(&net.a, &a, SENDER, &[&net.b_addr, &N.to_string()])?;
    let got: u64 = line(&mut rx)?.parse()?;
    ensure!(tx.wait()?.success() && rx.wait()?.success(), "sender or receiver failed");
    assert_eq!(got, N);
    let kernel = ImpairedPair::nstat(&net.a, "TcpRetransSegs")? - before;
    let id = netobs::cgroup_id(&a.0)?;
    let ours: u64 = obs.tcp()?.iter().filter(|(k, _)| k.cgroup_id == id).map(|(_, v)| v.retrans_segs).sum();
    ensure!(kernel > 0, "the forwarder dropped data packets, so the sender must have retransmitted");
    assert_eq!(ours, kernel, "retransmitted segments: ours vs nstat TcpRetransSegs in the sender's namespace");
    Ok(())
}

#[test]
fn rtt_under_a_50ms_delay_lands_in_the_bucket_ss_agrees_with() -> Result<()> {
    require_root()?;
    let tag = std::process::id() % 100_000 + 500_000;
    let base = test_root(tag)?;
    let parent = Cgroup::new(base.clone())?;
    let (a, b) = (Cgroup::new(base.join("sender"))?, Cgroup::new(base.join("receiver"))?);
    let net = ImpairedPair::new(tag, 50, 0)?;
    let obs = NetObs::attach(&parent.0, &[], &[])?;
    let mut rx = spawn_in(&net.b, &b, RECEIVER, &[&net.b_addr])?;
    listening(&mut rx)?;
    let mut tx = spawn_in(&net.a, &a, HOLDING_SENDER, &[&net.b_addr, &(256 * 1024).to_string()])?;
    ensure!(line(&mut tx)? == "sent", "sender did not send");
    // The kernel's own view of the live connection: "rtt:<srtt ms>/<rttvar ms>".
    let out = Command::new("nsenter").arg(format!("--net=/run/netns/{}", net.a)).args(["ss", "-tinH", "dst", &net.b_addr]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let srtt_ms: f64 = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rtt:"))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no rtt in ss output: {text}"))?;
    writeln!(tx.stdin.as_mut().context("stdin")?, "close")?;
    let _ = line(&mut rx)?;
    ensure!(tx.wait()?.success() && rx.wait()?.success(), "sender or receiver failed");

    let id = netobs::cgroup_id(&a.0)?;
    let tcp = obs.tcp()?;
    let (_, v) = tcp.iter().find(|(k, _)| k.cgroup_id == id).context("sender's TCP series")?;
    ensure!(v.rtt_count > 0, "at least one RTT sample: {v:?}");
    let ss_bucket = ((srtt_ms * 1000.0) as u64).ilog2() as usize;
    assert!((50.0..60.0).contains(&srtt_ms), "ss saw the 50 ms delay: {srtt_ms} ms");
    assert_eq!(ss_bucket, 15, "50 ms is in [32.768, 65.536) ms");
    let filled: Vec<usize> = v.rtt.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, _)| i).collect();
    assert_eq!(filled, vec![ss_bucket], "every sample in ss's bucket: {v:?}");
    let mean_ms = v.rtt_sum_us as f64 / v.rtt_count as f64 / 1000.0;
    assert!((mean_ms - srtt_ms).abs() < 10.0, "mean sampled srtt {mean_ms} ms vs ss {srtt_ms} ms");
    Ok(())
}

const MANY_CGROUPS: &str = r#"
import os, socket, sys
sys.stdin.readline()
me = str(os.getpid())
for d in sys.argv[2:]:
    with open(os.path.join(d, "cgroup.procs"), "w") as f: f.write(me)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x" * 100, ("127.0.0.1", int(sys.argv[1])))
    s.close()
with open(os.path.join(os.path.dirname(sys.argv[2]), "cgroup.procs"), "w") as f: f.write(me)
print("done", flush=True)
"#;

#[test]
fn a_thousand_pod_cgroups_created_and_deleted_leave_no_series_and_no_map_entries() -> Result<()> {
    use hearth_agent::netobs::collect::Collector;
    use hearth_agent::netobs::pods::{PodRef, PodTable};
    use std::time::{Duration, Instant};

    require_root()?;
    let tag = std::process::id() % 100_000 + 600_000;
    let base = test_root(tag)?;
    let parent = Cgroup::new(base.clone())?;
    let obs = NetObs::attach(&parent.0, &[], &[])?;
    let names = PodTable::default();
    let mut pods = Vec::new();
    for i in 0..1000u32 {
        let uid = format!("{i:08x}-0000-4000-8000-{tag:012x}");
        let cg = Cgroup::new(base.join(format!("pod{uid}")))?;
        names.insert(&uid, PodRef { namespace: "load".into(), name: format!("p{i}") });
        pods.push(cg);
    }
    let (mut collector, metrics) = Collector::new(obs, base.clone(), std::sync::Arc::new(names), Duration::from_secs(60));
    let dirs: Vec<String> = pods.iter().map(|c| c.0.display().to_string()).collect();
    // Someone listens on the port the pods send to: a datagram to a closed port comes back
    // as an ICMP unreachable, which the kernel may count as ingress for the pod whose socket
    // is still open (a second series for that pod, now and then).
    let sink = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
    let mut args = vec![sink.local_addr()?.port().to_string()];
    args.extend(dirs);
    let holder = Cgroup::new(base.join("holder"))?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = spawn_in_host(&holder, MANY_CGROUPS, &args)?;
    assert_eq!(line(&mut p)?, "done");
    ensure!(p.wait()?.success(), "workload failed");
    drop(sink);

    let t0 = Instant::now();
    collector.tick(t0);
    let (traffic, _, _, _) = metrics.sizes();
    if traffic != 1000 {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let text = hearth_service::http::prometheus_text(&registry)?;
        let odd: Vec<&str> = text.lines().filter(|l| l.starts_with("hearth_pod_network") && !l.contains("namespace=\"load\"")).collect();
        panic!("one egress series per pod, got {traffic}; series not of the 1000 pods:\n{}", odd.join("\n"));
    }
    assert_eq!(metrics.pod_bytes("load", "p999"), vec![("egress".to_owned(), "internet".to_owned(), 128)]);
    let ids: HashSet<u64> = pods.iter().map(|c| netobs::cgroup_id(&c.0)).collect::<std::io::Result<_>>()?;
    ensure!(collector.obs().traffic()?.iter().filter(|(k, _)| ids.contains(&k.cgroup_id)).count() == 1000, "1000 kernel entries");

    drop(pods); // rmdir every pod cgroup
    collector.tick(t0 + Duration::from_secs(1));
    let left = collector.obs().traffic()?.iter().filter(|(k, _)| ids.contains(&k.cgroup_id)).count();
    assert_eq!(left, 0, "map entries of deleted cgroups reclaimed");
    assert_eq!(metrics.sizes().0, 1000, "deleted pods' series stay until forgotten (final values scrapeable)");
    collector.tick(t0 + Duration::from_secs(61));
    assert_eq!(metrics.sizes().0, 0, "and are forgotten after the delay");
    let mut out = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    out.push_str(&hearth_service::http::prometheus_text(&registry)?);
    assert!(out.contains("hearth_pod_network_reclaimed_entries_total 1000"), "{out}");
    assert!(!out.contains("namespace=\"load\""), "no series left for the deleted pods");
    Ok(())
}

#[tokio::test]
async fn the_agent_names_pods_from_the_kubernetes_api_and_serves_their_network_metrics() -> Result<()> {
    use hearth_tests::{AgentProc, TestPki, http_get, start_controller, wait_for};
    use std::time::Duration;
    require_root()?;
    let tag = std::process::id() % 100_000 + 700_000;
    let base = test_root(tag)?;
    let _parent = Cgroup::new(base.clone())?;
    let uid = format!("0000beef-0000-4000-8000-{tag:012x}");
    let pod = Cgroup::new(base.join(format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"))))?;
    let dir = tempfile::tempdir()?;
    let (api, kube_yaml) = hearth_tests::agent_api_server(dir.path(), "net-1").await?;
    api.add_pod_with_uid("serving", "vllm-0", "net-1", &uid);
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let controller = start_controller(&pki, stop, |_| {}).await?.grpc_addr;
    // The pod's server, on the host's loopback (hostNetwork-style): it binds a port the
    // kernel picks, which the agent is told to watch, and listens once the agent is up.
    let mut rx = spawn_in_host(&pod, &RECEIVER.replace("5001", "0"), &["127.0.0.1"])?;
    let port = bound_port(&mut rx)?;
    let agent = AgentProc::start(
        dir.path(),
        &pki,
        "net-1",
        controller,
        &format!(
            "network: {{cgroup_root: {}, collect_interval: 300ms, ports: [{port}], peers: [{{name: loopback, cidrs: [127.0.0.0/8]}}]}}\n{kube_yaml}",
            base.display()
        ),
    )
    .await?;
    wait_for("agent metrics", Duration::from_secs(20), || async {
        Ok(http_get(agent.http, "/metrics").await.is_ok_and(|(s, _)| s == 200).then_some(()))
    })
    .await?;

    // A server and a client in the same pod.
    const N: u64 = 1024 * 1024 + 3;
    listen_now(&mut rx)?;
    let mut tx = spawn_in_host(&pod, &SENDER.replace("5001", &port.to_string()), &["127.0.0.1", &N.to_string()])?;
    assert_eq!(line(&mut rx)?.parse::<u64>()?, N);
    let _ = tcp_info_line(&mut tx)?;
    ensure!(tx.wait()?.success() && rx.wait()?.success(), "sender or receiver failed");

    let l = r#"namespace="serving",pod="vllm-0""#;
    let established = format!(r#"hearth_pod_network_tcp_connections_total{{{l},peer="loopback",role="server",result="established"}} 1"#);
    let listener = format!(r#"hearth_pod_network_listener_bytes_total{{{l},port="{port}",direction="ingress"}}"#);
    let body = wait_for("the pod's series under its Kubernetes name", Duration::from_secs(30), || async {
        let (_, body) = http_get(agent.http, "/metrics").await?;
        Ok((body.contains(&established)
            && body.contains(&listener)
            && body.contains(r#"hearth_pod_network_enabled{family="tcp",reason=""} 1"#))
        .then_some(()))
    })
    .await
    .map(|_| ());
    let (_, text) = http_get(agent.http, "/metrics").await?;
    body.with_context(|| text.lines().filter(|l| l.contains("hearth_pod_network")).collect::<Vec<_>>().join("\n"))?;
    assert!(api.forbidden().is_empty(), "{:?}", api.forbidden());
    let payload = format!(r#"hearth_pod_network_payload_bytes_total{{{l},direction="ingress",peer="loopback"}} "#);
    let got: u64 = text.lines().find_map(|x| x.strip_prefix(&payload)).context("ingress payload series")?.parse()?;
    ensure!(got >= N, "the pod received at least N payload bytes: {got}");
    Ok(())
}

#[tokio::test]
async fn without_a_usable_cgroup_the_agent_runs_and_says_why_network_metrics_are_off() -> Result<()> {
    use hearth_tests::{AgentProc, TestPki, http_get, start_controller, wait_for};
    use std::time::Duration;
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let controller = start_controller(&pki, stop, |_| {}).await?.grpc_addr;
    // A plain directory: the kernel refuses to attach cgroup programs to it (and without
    // root, loading fails first); either way the families are off with the kernel's reason.
    let not_a_cgroup = dir.path().join("not-a-cgroup");
    std::fs::create_dir_all(&not_a_cgroup)?;
    let agent =
        AgentProc::start(dir.path(), &pki, "net-off", controller, &format!("network: {{cgroup_root: {}}}\n", not_a_cgroup.display()))
            .await?;
    let text = wait_for("metrics", Duration::from_secs(20), || async {
        Ok(http_get(agent.http, "/metrics")
            .await
            .ok()
            .filter(|(s, b)| *s == 200 && b.contains("hearth_node_cpu_usage_ratio"))
            .map(|(_, b)| b))
    })
    .await?;
    let off: Vec<&str> = text.lines().filter(|l| l.starts_with("hearth_pod_network_enabled{")).collect();
    assert_eq!(off.len(), 2, "{text}");
    assert!(off.iter().all(|l| l.ends_with(" 0") && !l.contains("reason=\"\"")), "{off:?}");
    assert!(!text.contains("hearth_pod_network_bytes_total"), "no traffic series when off");
    // Readiness also waits for the first report to the controller, which can land after the
    // first /metrics render on a loaded machine; what matters is that it comes.
    wait_for("the rest of the agent is ready", Duration::from_secs(20), || async {
        Ok((http_get(agent.http, "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    Ok(())
}
