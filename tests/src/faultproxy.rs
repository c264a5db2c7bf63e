//! A loopback HTTP/1.1 proxy in front of a real S3 server that breaks GET responses on
//! demand (a reset, a 503 SlowDown, a truncation, a flipped byte, a stall), for testing a
//! download engine's retries and integrity checks. Faults wait in a queue and each is spent
//! on one response; everything else passes through byte for byte, Host header included, so
//! SigV4 signatures made for the proxy's address still verify upstream.
//!
//! Client connections are kept alive; each request gets a fresh upstream connection, so a
//! broken response never leaves a half-read upstream connection behind.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const MAX_HEAD: u64 = 64 * 1024;
/// How much of the body `Reset` lets through, at most.
const RESET_AFTER: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyFault {
    /// Sends the response head and a few body bytes, then resets the client connection (RST).
    Reset,
    /// Answers the next GET itself: 503 with an S3 `SlowDown` XML error; upstream never sees it.
    SlowDown,
    /// Sends the head and the first half of the body, then closes the connection (FIN).
    Truncate,
    /// Passes the response with the middle byte of the body inverted.
    FlipByte,
    /// Sends the head, then nothing for this long, then the body.
    Stall(Duration),
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    /// Each fault with the substring a request target must contain for it to apply.
    faults: Mutex<VecDeque<(Option<String>, ProxyFault)>>,
    requests: AtomicU64,
    applied: AtomicU64,
}

impl Shared {
    /// Takes the next fault if it targets `target` and `wanted` accepts it; it stays queued
    /// otherwise.
    fn take_if(&self, target: &str, wanted: impl Fn(&ProxyFault) -> bool) -> Option<ProxyFault> {
        let mut q = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        // The first fault aimed at this target, in queue order; faults for other targets wait.
        let i = q.iter().position(|(only, _)| only.as_deref().is_none_or(|o| target.contains(o)))?;
        if !wanted(&q[i].1) {
            return None;
        }
        let (_, f) = q.remove(i)?;
        self.applied.fetch_add(1, Ordering::Relaxed);
        Some(f)
    }
}

impl FaultProxy {
    /// Listens on a loopback port the kernel picks (`addr`) and proxies to `upstream` until dropped.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            // Owned by this task, so aborting it on drop aborts every connection too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((c, _)) => { conns.spawn(serve(c, upstream, s.clone())); }
                        // Out of file descriptors, say: back off rather than spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Ok(Self { addr, shared, task })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a fault for the next GET response with a body (`SlowDown`: the next GET).
    pub fn inject(&self, f: ProxyFault) {
        self.shared.faults.lock().unwrap_or_else(PoisonError::into_inner).push_back((None, f));
    }

    /// Like `inject`, for a request whose target (path and query) contains `target`: an
    /// object key, so listings and other objects pass untouched.
    pub fn inject_for(&self, target: &str, f: ProxyFault) {
        self.shared.faults.lock().unwrap_or_else(PoisonError::into_inner).push_back((Some(target.to_owned()), f));
    }

    /// Requests received from clients, faulted or not.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    pub fn faults_applied(&self) -> u64 {
        self.shared.applied.load(Ordering::Relaxed)
    }

    /// Faults queued and not yet spent.
    pub fn pending(&self) -> usize {
        self.shared.faults.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Next {
    KeepAlive,
    Close,
    Reset,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Fixed(u64),
    Chunked,
    UntilClose,
}

struct Head {
    raw: Vec<u8>,
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers.iter().filter(|(n, _)| n == name).any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn status(&self) -> io::Result<u16> {
        self.start.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| invalid("status line"))
    }

    fn body(&self, response: bool) -> io::Result<Body> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Body::Chunked);
        }
        match self.header("content-length") {
            Some(v) => v.parse().map(Body::Fixed).map_err(|_| invalid("content-length")),
            None if response => Ok(Body::UntilClose),
            None => Ok(Body::None),
        }
    }
}

trait Rd: AsyncBufRead + Unpin {}
impl<T: AsyncBufRead + Unpin> Rd for T {}
trait Wr: AsyncWrite + Unpin {}
impl<T: AsyncWrite + Unpin> Wr for T {}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed HTTP: {what}"))
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let reset = {
        let (rd, mut wr) = client.split();
        let mut rd = BufReader::new(rd);
        loop {
            match exchange(&mut rd, &mut wr, upstream, &shared).await {
                Ok(Next::KeepAlive) => {}
                Ok(Next::Reset) => break true,
                Ok(Next::Close) | Err(_) => break false,
            }
        }
    };
    if reset {
        // Closing with unsent data dropped and a zero linger sends RST, not FIN.
        let _ = client.set_zero_linger();
    }
}

/// One request and its response.
async fn exchange(crd: &mut impl Rd, cwr: &mut impl Wr, upstream: SocketAddr, shared: &Shared) -> io::Result<Next> {
    let Some(req) = read_head(crd).await? else {
        return Ok(Next::Close);
    };
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let is_get = req.start.starts_with("GET ");
    let target = req.start.split_whitespace().nth(1).unwrap_or("").to_owned();
    let req_body = req.body(false)?;
    let client_close = req.has_token("connection", "close");
    let keep = if client_close { Next::Close } else { Next::KeepAlive };

    if is_get && shared.take_if(&target, |f| *f == ProxyFault::SlowDown).is_some() {
        forward_body(crd, &mut tokio::io::sink(), req_body).await?;
        cwr.write_all(&slow_down()).await?;
        return Ok(keep);
    }

    let mut up = TcpStream::connect(upstream).await?;
    let _ = up.set_nodelay(true);
    let (urd, mut uwr) = up.split();
    let mut urd = BufReader::new(urd);
    uwr.write_all(&req.raw).await?;
    // Send the request body while waiting for the answer: upstream may send `100 Continue`
    // first, or a final status without reading the body.
    let (resp, body_sent) = {
        let send = forward_body(crd, &mut uwr, req_body);
        let recv = read_response_head(&mut urd, cwr);
        tokio::pin!(send, recv);
        let mut sent = req_body == Body::None;
        loop {
            tokio::select! {
                r = &mut send, if !sent => { r?; sent = true; }
                r = &mut recv => break (r?, sent),
            }
        }
    };
    let Some(resp) = resp else {
        return Ok(Next::Close);
    };
    let status = resp.status()?;
    let head_req = req.start.starts_with("HEAD ");
    let resp_body = if head_req || status / 100 == 1 || status == 204 || status == 304 { Body::None } else { resp.body(true)? };
    let close = !body_sent || client_close || resp.has_token("connection", "close") || resp_body == Body::UntilClose;
    let next = if close { Next::Close } else { Next::KeepAlive };

    cwr.write_all(&resp.raw).await?;
    match resp_body {
        Body::Fixed(len) if is_get && len > 0 && matches!(status, 200 | 206) => {
            match shared.take_if(&target, |f| *f != ProxyFault::SlowDown) {
                Some(f) => faulty_body(&mut urd, cwr, len, f, next).await,
                None => forward_body(&mut urd, cwr, resp_body).await.map(|()| next),
            }
        }
        _ => forward_body(&mut urd, cwr, resp_body).await.map(|()| next),
    }
}

/// Streams a `len`-byte body with `fault` applied.
async fn faulty_body(urd: &mut impl Rd, cwr: &mut impl Wr, len: u64, fault: ProxyFault, next: Next) -> io::Result<Next> {
    let (stop, next) = match fault {
        ProxyFault::Reset => ((len / 2).min(RESET_AFTER), Next::Reset),
        ProxyFault::Truncate => (len / 2, Next::Close),
        _ => (len, next),
    };
    let flip_at = (fault == ProxyFault::FlipByte).then_some(len / 2);
    if let ProxyFault::Stall(d) = fault {
        cwr.flush().await?;
        tokio::time::sleep(d).await;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < stop {
        let want = (stop - off).min(buf.len() as u64) as usize;
        let got = urd.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(at) = flip_at.filter(|at| (off..off + got as u64).contains(at)) {
            buf[(at - off) as usize] ^= 0xff;
        }
        cwr.write_all(&buf[..got]).await?;
        off += got as u64;
    }
    cwr.flush().await?;
    Ok(next)
}

fn slow_down() -> Vec<u8> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                <Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>";
    format!(
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         x-amz-request-id: faultproxy\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn copy_exact(r: &mut impl Rd, w: &mut impl Wr, n: u64) -> io::Result<()> {
    if tokio::io::copy_buf(&mut (&mut *r).take(n), w).await? < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// One line including its `\n`, at most `MAX_HEAD` bytes; EOF or a longer line is an error.
async fn read_line(r: &mut impl Rd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let n = (&mut *r).take(MAX_HEAD).read_until(b'\n', buf).await?;
    if n == 0 || !buf.ends_with(b"\n") {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(n)
}

/// A request or response head; None on a clean EOF before its first byte.
async fn read_head(r: &mut impl Rd) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        if r.fill_buf().await?.is_empty() && raw.is_empty() {
            return Ok(None);
        }
        let n = read_line(r, &mut raw).await?;
        if raw.len() == n && (raw == b"\r\n" || raw == b"\n") {
            raw.clear(); // a stray empty line between messages
        } else if raw.ends_with(b"\n\r\n") || raw.ends_with(b"\n\n") {
            break;
        } else if raw.len() as u64 > MAX_HEAD {
            return Err(invalid("head too long"));
        }
    }
    let text = std::str::from_utf8(&raw).map_err(|_| invalid("head not UTF-8"))?;
    let mut lines = text.lines();
    let start = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once(':').map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned())).ok_or_else(|| invalid("header")))
        .collect::<io::Result<_>>()?;
    Ok(Some(Head { raw, start, headers }))
}

/// The final response head, relaying any `1xx` interim responses to the client.
async fn read_response_head(urd: &mut impl Rd, cwr: &mut impl Wr) -> io::Result<Option<Head>> {
    loop {
        let Some(head) = read_head(urd).await? else {
            return Ok(None);
        };
        let status = head.status()?;
        if status / 100 != 1 || status == 101 {
            return Ok(Some(head));
        }
        cwr.write_all(&head.raw).await?;
    }
}

async fn forward_body(r: &mut impl Rd, w: &mut impl Wr, body: Body) -> io::Result<()> {
    match body {
        Body::None => Ok(()),
        Body::Fixed(n) => copy_exact(r, w, n).await,
        Body::UntilClose => tokio::io::copy_buf(r, w).await.map(drop),
        Body::Chunked => loop {
            let mut line = Vec::new();
            read_line(r, &mut line).await?;
            w.write_all(&line).await?;
            let size = std::str::from_utf8(&line).ok().and_then(|l| l.split(';').next()).map(str::trim);
            let size = size.and_then(|s| u64::from_str_radix(s, 16).ok()).ok_or_else(|| invalid("chunk size"))?;
            if size > 0 {
                copy_exact(r, w, size + 2).await?; // data and its CRLF
                continue;
            }
            loop {
                let mut trailer = Vec::new();
                read_line(r, &mut trailer).await?;
                w.write_all(&trailer).await?;
                if trailer == b"\r\n" || trailer == b"\n" {
                    return Ok(());
                }
            }
        },
    }
}
