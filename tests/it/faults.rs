//! A TCP proxy that injects faults between a client and a server: the server's
//! address seen through it, and a switch that takes the link down (every open
//! connection cut, new ones closed at once) or drops a share of responses (the
//! request is delivered and answered, and the connection is closed before the
//! answer reaches the client).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Everything passes.
    Up,
    /// Open connections are cut, new ones closed at once: the server looks down.
    Down,
    /// Each connection's response is dropped with this probability (0 to 100 per
    /// cent): the server has carried out the request, the client never hears of it.
    DropResponses(u8),
}

pub struct FaultProxy {
    /// `127.0.0.1:port` of the proxy.
    pub address: String,
    link: watch::Sender<Link>,
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream` (`host:port`), link up.
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let (link, watching) = watch::channel(Link::Up);
        let dropped = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let counter = dropped.clone();
        let task = tokio::spawn(async move {
            let mut sequence = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                sequence += 1;
                let link = *watching.borrow();
                let drop_this = match link {
                    Link::Down => continue,
                    Link::Up => false,
                    Link::DropResponses(percent) => {
                        crate::history::Rng::new(sequence).below(100) < u64::from(percent)
                    }
                };
                tokio::spawn(carry(
                    client,
                    upstream.clone(),
                    watching.clone(),
                    drop_this,
                    counter.clone(),
                ));
            }
        });
        FaultProxy {
            address,
            link,
            dropped,
            task,
        }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// How many responses were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection through the proxy, until either side closes or the link goes down.
async fn carry(
    mut client: TcpStream,
    upstream: String,
    mut link: watch::Receiver<Link>,
    drop_response: bool,
    dropped: Arc<AtomicU64>,
) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let work = async {
        if drop_response {
            // Pass the request on; at the first byte of the answer, cut both sides.
            let (mut client_read, _client_write) = client.split();
            let (mut server_read, mut server_write) = server.split();
            let forward = tokio::io::copy(&mut client_read, &mut server_write);
            let mut first = [0u8; 1];
            tokio::select! {
                _ = forward => {}
                read = server_read.read(&mut first) => {
                    if matches!(read, Ok(n) if n > 0) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        } else {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
    };
    tokio::select! {
        _ = work => {}
        _ = link.wait_for(|l| *l == Link::Down) => {}
    }
    let _ = client.shutdown().await;
}
