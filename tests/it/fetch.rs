use std::sync::atomic::Ordering;

use crate::helpers::{service_settings, spawn_app, test_settings};
use crate::metrics::sample;
use crate::proxy::cutting_proxy;
use dsa_ingest::config::S3Settings;
use dsa_ingest::import::Importer;
use dsa_ingest::metrics::metrics;
use dsa_ingest::sample::sample_csv;

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
