//! A loopback TCP relay whose address outlives the server behind it. A server that binds
//! port 0 gets a new port each time it starts, so a test that restarts one (or starts it
//! late) points its clients at a relay and repoints the relay at each new address; the
//! clients' configuration never changes and no port is ever given up and taken again.
//!
//! Until it is first pointed at a server, the relay's port is bound but not listening, so
//! connections are refused exactly as by a server that is not there. Once listening, a
//! connection whose server is gone is reset.

use std::net::SocketAddr;

use anyhow::Result;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub struct Relay {
    pub addr: SocketAddr,
    /// Bound, not yet listening: taken when the relay is first pointed somewhere.
    unopened: Option<TcpSocket>,
    upstream: watch::Sender<Option<SocketAddr>>,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds a port on 127.0.0.1 and refuses connections on it until [`Relay::forward_to`].
    pub fn new() -> Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = socket.local_addr()?;
        Ok(Self { addr, unopened: Some(socket), upstream: watch::Sender::new(None), task: None })
    }

    /// Sends new connections to `upstream` from now on (open ones stay where they are).
    pub fn forward_to(&mut self, upstream: SocketAddr) -> Result<()> {
        self.upstream.send_replace(Some(upstream));
        if let Some(socket) = self.unopened.take() {
            let listener = socket.listen(64)?;
            let upstream = self.upstream.subscribe();
            self.task = Some(tokio::spawn(async move {
                // Owned by this task, so aborting it on drop aborts every connection too.
                let mut conns = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let to = *upstream.borrow();
                            conns.spawn(relay(client, to));
                        }
                        Some(_) = conns.join_next() => {}
                    }
                }
            }));
        }
        Ok(())
    }
}

async fn relay(mut client: TcpStream, upstream: Option<SocketAddr>) {
    let server = match upstream {
        Some(a) => TcpStream::connect(a).await.ok(),
        None => None,
    };
    match server {
        Some(mut server) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
        // The server is gone: reset, as connecting to it directly would have been refused.
        None => {
            let _ = client.set_zero_linger();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
