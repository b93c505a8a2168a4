//! TCP proxies: in front of the S3 store, a network that breaks bodies or a slow one;
//! in front of PostgreSQL or RabbitMQ, a long link that the test can cut.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy in front of the S3 store that cuts every connection after it has sent
/// `budget` bytes of response: a network that breaks bodies mid-stream.
pub async fn cutting_proxy(upstream: String, budget: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let cuts = Arc::new(AtomicUsize::new(0));
    let counter = cuts.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut sent = 0;
                let mut buffer = vec![0u8; 8192];
                loop {
                    let read = match server_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => read,
                    };
                    let allowed = read.min(budget - sent);
                    if client_write.write_all(&buffer[..allowed]).await.is_err() {
                        break;
                    }
                    sent += allowed;
                    if sent == budget {
                        counter.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                requests.abort();
                // Dropping both halves closes the client's connection mid-response.
            });
        }
    });
    (format!("http://{address}"), cuts)
}

/// A proxy that passes responses at no more than `bytes_per_second` per connection, so
/// an import of a small file lasts long enough to be interrupted on purpose.
pub async fn throttled_proxy(upstream: String, bytes_per_second: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let started = Instant::now();
                let mut sent = 0u64;
                let mut buffer = vec![0u8; 4096];
                loop {
                    let read = match server_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => read,
                    };
                    if client_write.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                    sent += read as u64;
                    // Pacing is the point of this proxy: the test wants a slow network.
                    let due = Duration::from_secs_f64(sent as f64 / bytes_per_second as f64);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(ahead).await;
                    }
                }
                requests.abort();
            });
        }
    });
    format!("http://{address}")
}

/// A TCP proxy for the links between a `dsa-ingest` child and PostgreSQL or RabbitMQ:
/// it forwards both ways, holding every chunk back by `latency` (a slow network, not a
/// narrow one: chunks are pipelined, so throughput stays), and on the test's word cuts
/// every open connection at once and turns new ones away (a network outage).
pub struct LinkProxy {
    address: std::net::SocketAddr,
    state: Arc<LinkState>,
    accepting: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct LinkState {
    /// Cancelled to cut the connections forwarded so far; replaced by a fresh token at
    /// each cut, so connections accepted afterwards live on.
    cut: std::sync::Mutex<tokio_util::sync::CancellationToken>,
    /// While set, a new connection is reset as soon as it is accepted.
    refusing: std::sync::atomic::AtomicBool,
    forwarded: AtomicUsize,
    open: AtomicUsize,
    cut_count: AtomicUsize,
    refused: AtomicUsize,
}

impl LinkProxy {
    /// Listens on a port of its own and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str, latency: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(LinkState::default());
        let upstream = upstream.to_owned();
        let shared = state.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // The token is taken before the refusal is read: an outage sets the
                // refusal and then cuts, so a connection either sees the refusal or
                // holds the token that the cut cancels, never neither.
                let cut = shared.cut.lock().unwrap().clone();
                if shared.refusing.load(Ordering::SeqCst) {
                    // A reset rather than a close: the client sees the network fail.
                    let _ = client.set_zero_linger();
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let upstream = upstream.clone();
                let state = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        let _ = client.set_zero_linger();
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    state.forwarded.fetch_add(1, Ordering::SeqCst);
                    state.open.fetch_add(1, Ordering::SeqCst);
                    if forward(client, server, latency, cut).await == Ended::Cut {
                        state.cut_count.fetch_add(1, Ordering::SeqCst);
                    }
                    state.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            address,
            state,
            accepting,
        }
    }

    /// A proxy in front of the server `url` names (`scheme://[user@]host:port/...`),
    /// and the same URL pointed at the proxy instead.
    pub async fn in_front_of(url: &str, latency: Duration) -> (Self, String) {
        let (start, end) = authority(url);
        let host_port = &url[start..end];
        assert!(
            host_port
                .rsplit_once(':')
                .is_some_and(|(_, port)| port.parse::<u16>().is_ok()),
            "{url} names no port"
        );
        let proxy = Self::start(host_port, latency).await;
        let through = format!("{}{}{}", &url[..start], proxy.address, &url[end..]);
        (proxy, through)
    }

    /// Cuts every connection open now, at once, with a reset each way.
    pub fn cut_all(&self) {
        let mut cut = self.state.cut.lock().unwrap();
        cut.cancel();
        *cut = tokio_util::sync::CancellationToken::new();
    }

    /// From now on, resets new connections as they arrive (`true`), or forwards them
    /// again (`false`).
    pub fn refuse_new(&self, refuse: bool) {
        self.state.refusing.store(refuse, Ordering::SeqCst);
    }

    /// Connections forwarded to the server since the start.
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Connections forwarded and not yet ended.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Connections that ended because the test cut them.
    pub fn cut(&self) -> usize {
        self.state.cut_count.load(Ordering::SeqCst)
    }

    /// Connections turned away while refusing.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut_all();
    }
}

/// Where the `host:port` of `url` starts and ends: after `scheme://` and any user
/// information, up to the path.
fn authority(url: &str) -> (usize, usize) {
    let after_scheme = url.find("://").expect("a URL with a scheme") + 3;
    let end = url[after_scheme..]
        .find(['/', '?'])
        .map_or(url.len(), |at| after_scheme + at);
    let start = url[after_scheme..end]
        .rfind('@')
        .map_or(after_scheme, |at| after_scheme + at + 1);
    (start, end)
}

#[derive(PartialEq)]
enum Ended {
    /// Both sides closed their end.
    Closed,
    /// The test cut the connection.
    Cut,
}

/// Forwards between `client` and `server` until both directions end or `cut` fires;
/// a cut resets both sockets, so neither side gets an orderly end of stream.
async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    latency: Duration,
    cut: tokio_util::sync::CancellationToken,
) -> Ended {
    let ended = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::select! {
            _ = cut.cancelled() => Ended::Cut,
            _ = futures::future::join(
                delayed_copy(client_read, server_write, latency),
                delayed_copy(server_read, client_write, latency),
            ) => Ended::Closed,
        }
    };
    if ended == Ended::Cut {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
    ended
}

/// Copies `from` to `to`, each chunk written `latency` after it was read. Reading goes
/// on meanwhile, so chunks in flight overlap as on a real long link.
async fn delayed_copy(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    latency: Duration,
) {
    let (chunks, mut in_flight) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reading = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let due = Instant::now() + latency;
            if chunks.send((due, buffer[..read].to_vec())).await.is_err() {
                break;
            }
        }
        // Dropping the sender lets the writer finish what is in flight, then close.
    };
    let writing = async move {
        while let Some((due, chunk)) = in_flight.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    futures::future::join(reading, writing).await;
}
