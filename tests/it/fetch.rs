use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dsa_ingest::config::S3Settings;
use dsa_ingest::import::Importer;
use dsa_ingest::metrics::metrics;
use dsa_ingest::sample::sample_csv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{service_settings, spawn_app, test_settings};
use crate::metrics::sample;

/// A TCP proxy in front of the S3 store that cuts every connection after it has sent
/// `budget` bytes of response: a network that breaks bodies mid-stream.
async fn cutting_proxy(upstream: String, budget: usize) -> (String, Arc<AtomicUsize>) {
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

#[tokio::test]
async fn a_body_broken_mid_stream_is_resumed_from_the_last_byte_received() {
    let app = spawn_app().await;
    app.put("flaky.csv", sample_csv(3_000, 21)).await;
    let reference = app.import("reference", "flaky.csv").await;

    let services = service_settings();
    let upstream = services["S3_ENDPOINT"]
        .trim_start_matches("http://")
        .to_owned();
    let (endpoint, cuts) = cutting_proxy(upstream, 3_000).await;
    let flaky_s3 = dsa_ingest::s3::client(&S3Settings {
        endpoint: Some(endpoint),
        region: services["S3_REGION"].clone(),
        bucket: None,
    })
    .await;
    let mut settings = test_settings();
    settings.chunk_size = 16 * 1024;
    settings.fetch_concurrency = 2;
    let importer = Importer::new(app.pool.clone(), Some(flaky_s3), settings);
    let (run_id, _) = app.create_run(&importer, "flaky", "flaky.csv", false).await;
    let retries = || sample(&metrics().encode().unwrap(), "dsa_s3_retries_total");
    let retries_before = retries();

    let summary = importer
        .run(run_id)
        .await
        .expect("the import survives broken bodies");

    assert!(
        cuts.load(Ordering::Relaxed) > 10,
        "the proxy cut too few responses"
    );
    assert_eq!(summary.tree_hash, reference.tree_hash);
    assert_eq!(summary.rows, 3_000);
    // Each retry asked only for the bytes not yet received: nothing was read twice.
    assert_eq!(summary.bytes_read, summary.bytes);
    // The metrics are process-wide, so only a rise is certain, not its size.
    assert!(
        retries() > retries_before,
        "resumed ranges were not counted"
    );
}
