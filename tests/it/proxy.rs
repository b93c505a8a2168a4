//! TCP proxies in front of the S3 store: a network that breaks bodies, or a slow one.

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
