//! A TCP proxy that injects faults between a client and a server: the server's
//! address seen through it, and a switch that takes the link down (every open
//! connection cut, new ones closed at once) or drops a share of responses (the
//! request is delivered and answered, and the connection is closed before the
//! answer reaches the client). In front of PostgreSQL it can also lose the answers
//! to a share of `COMMIT`s: the transaction is committed and the client only sees
//! its connection cut, the one outcome a client can never tell apart from a
//! rollback.

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
    /// PostgreSQL only ([`FaultProxy::postgres`]): each `COMMIT` is carried out and
    /// then, with this probability (0 to 100 per cent), its connection is cut before
    /// the answer reaches the client.
    LoseCommits(u8),
}

pub struct FaultProxy {
    /// `127.0.0.1:port` of the proxy.
    pub address: String,
    link: watch::Sender<Link>,
    dropped: Arc<AtomicU64>,
    lost_commits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream` (`host:port`), link up.
    pub async fn start(upstream: &str) -> FaultProxy {
        FaultProxy::open(upstream, None).await
    }

    /// A proxy to the PostgreSQL server at `upstream` that reads the client's side of
    /// the protocol, so it can lose the answers to `COMMIT`s ([`Link::LoseCommits`]);
    /// `seed` seeds its choices (connections open in an order of their own, so a run
    /// is not repeated exactly). It takes the link down; it does not drop responses.
    pub async fn postgres(upstream: &str, seed: u64) -> FaultProxy {
        FaultProxy::open(upstream, Some(seed)).await
    }

    async fn open(upstream: &str, postgres: Option<u64>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let (link, watching) = watch::channel(Link::Up);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost_commits = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let counter = dropped.clone();
        let lost = lost_commits.clone();
        let task = tokio::spawn(async move {
            let mut sequence = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                sequence += 1;
                let link = *watching.borrow();
                if let Some(seed) = postgres {
                    if link == Link::Down {
                        continue;
                    }
                    let rng = crate::history::Rng::new(seed ^ sequence);
                    tokio::spawn(carry_postgres(
                        client,
                        upstream.clone(),
                        watching.clone(),
                        rng,
                        lost.clone(),
                    ));
                    continue;
                }
                let drop_this = match link {
                    Link::Down => continue,
                    Link::Up | Link::LoseCommits(_) => false,
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
            lost_commits,
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

    /// How many `COMMIT`s were carried out with their answers lost so far.
    pub fn lost_commits(&self) -> u64 {
        self.lost_commits.load(Ordering::Relaxed)
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

/// One PostgreSQL connection through the proxy. The start-up is answered here as
/// far as encryption goes (no TLS, so the messages can be read), then the client's
/// messages are passed on, each looked at: a `COMMIT` (a simple query ending with
/// it, or the `Sync` after a `Bind` of a statement prepared as `COMMIT`) may be one
/// whose answer is lost. Then the server's side is muted first, the `COMMIT` passed
/// on and given time to be carried out, and both sides cut. (Only explicit
/// `COMMIT`s: a statement that commits on its own is answered as usual.)
async fn carry_postgres(
    mut client: TcpStream,
    upstream: String,
    mut link: watch::Receiver<Link>,
    mut rng: crate::history::Rng,
    lost: Arc<AtomicU64>,
) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if start_up(&mut client, &mut server).await.is_none() {
        return;
    }
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let muted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mute = muted.clone();
    let answers = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if mute.load(Ordering::SeqCst) || client_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    });
    let watched = link.clone();
    let requests = async {
        let mut client_read = tokio::io::BufReader::new(client_read);
        let mut reader = Frontend::default();
        while let Some(message) = reader.next(&mut client_read).await {
            let lose = reader.commits(&message)
                && matches!(*watched.borrow(), Link::LoseCommits(percent) if rng.below(100) < u64::from(percent));
            if lose {
                muted.store(true, Ordering::SeqCst);
            }
            if server_write.write_all(&message).await.is_err() {
                return;
            }
            if lose {
                // Carried out (or not: the client cannot tell), never answered.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = link.wait_for(|l| *l == Link::Down) => {}
    }
    answers.abort();
}

/// The most a message may claim to be (a script of a batch's changes is well under).
const LONGEST_MESSAGE: usize = 256 << 20;

/// The untyped start-up messages: an SSL or GSS encryption request is answered `N`
/// here (the client goes on unencrypted, as it does when a server says so), a
/// cancel request passed on, the start-up message passed on. `None` when the client
/// is gone or the connection was a cancel request.
async fn start_up(client: &mut TcpStream, server: &mut TcpStream) -> Option<()> {
    loop {
        let length = client.read_u32().await.ok()? as usize;
        let mut body = vec![0u8; length.checked_sub(4).filter(|n| *n <= LONGEST_MESSAGE)?];
        client.read_exact(&mut body).await.ok()?;
        let code = body
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        if matches!(code, Some(80_877_103 | 80_877_104)) {
            client.write_all(b"N").await.ok()?;
            continue;
        }
        server
            .write_all(&(length as u32).to_be_bytes())
            .await
            .ok()?;
        server.write_all(&body).await.ok()?;
        if code == Some(80_877_102) {
            // A cancel request: the server answers by closing.
            let _ = tokio::io::copy_bidirectional(client, server).await;
            return None;
        }
        return Some(());
    }
}

/// The client's side of the PostgreSQL protocol after the start-up, message by
/// message, and which statements were prepared as `COMMIT`.
#[derive(Default)]
struct Frontend {
    commit_statements: std::collections::HashSet<Vec<u8>>,
    commit_bound: bool,
}

impl Frontend {
    /// The next whole message, as its bytes; `None` when the client is gone.
    async fn next(&mut self, from: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
        let kind = from.read_u8().await.ok()?;
        let length = from.read_u32().await.ok()?;
        let body = (length as usize)
            .checked_sub(4)
            .filter(|n| *n <= LONGEST_MESSAGE)?;
        let mut message = Vec::with_capacity(5 + body);
        message.push(kind);
        message.extend_from_slice(&length.to_be_bytes());
        message.resize(5 + body, 0);
        from.read_exact(&mut message[5..]).await.ok()?;
        Some(message)
    }

    /// Whether `message` completes a `COMMIT`: a simple query that ends with one, or
    /// the `Sync` after a `Bind` of a statement prepared as one (the server answers an
    /// `Execute` at the next `Sync`, which sqlx sends at once).
    fn commits(&mut self, message: &[u8]) -> bool {
        let (Some(&kind), Some(body)) = (message.first(), message.get(5..)) else {
            return false;
        };
        let is_commit = |sql: &[u8]| {
            let tail = &sql[sql.len().saturating_sub(32)..];
            let text = String::from_utf8_lossy(tail).to_ascii_uppercase();
            text.trim_end_matches(['\0', ';', ' ', '\n'])
                .ends_with("COMMIT")
        };
        let mut fields = body.split(|b| *b == 0);
        match kind {
            b'Q' => is_commit(body),
            b'P' => {
                let (name, sql) = (
                    fields.next().unwrap_or_default(),
                    fields.next().unwrap_or_default(),
                );
                if is_commit(sql) {
                    self.commit_statements.insert(name.to_vec());
                } else {
                    self.commit_statements.remove(name);
                }
                false
            }
            b'B' => {
                let statement = fields.nth(1).unwrap_or_default();
                self.commit_bound |= self.commit_statements.contains(statement);
                false
            }
            b'S' => std::mem::take(&mut self.commit_bound),
            _ => false,
        }
    }
}
