//! Prometheus metrics for the whole process; `http.rs` serves them.
//!
//! The metrics live in one process-wide [`Metrics`] (see [`metrics()`]) with a registry
//! of its own. The import core records only what nobody else can see (each batch
//! transaction, each S3 request); whoever runs an import records the run as a whole
//! from a [`CompletedImport`]. Every label takes its value from an enum or a fixed list,
//! so no input can make the number of series grow.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use sqlx::PgPool;

/// Import durations range from a fraction of a second (a small CSV) to hours (a 5 GiB
/// file on a slow store), so the buckets grow by about 2 to 3 times up to 4 hours.
const IMPORT_DURATION_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
    7200.0, 14400.0,
];

/// A batch transaction (10,000 rows by default) takes tens to hundreds of milliseconds;
/// the upper buckets catch lock waits and a struggling database.
const BATCH_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// `REFRESH MATERIALIZED VIEW CONCURRENTLY` grows with the number of datasets.
const SEARCH_REFRESH_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// Waiting for a pooled connection is free when the pool has one idle and takes up to
/// the acquire timeout (30 s) when every connection is held by an import.
const POOL_ACQUIRE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long the work done before a scrape (see [`Metrics::before_scrape`]) may take
/// before the scrape is answered with the values found last time.
pub const SCRAPE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Source formats as they appear in the `format` label; anything else is `other`.
pub const FORMATS: [&str; 6] = ["csv", "xlsx", "xls", "xlsb", "ods", "other"];

/// The `format` label for a source format, from a closed set.
pub fn format_label(format: &str) -> &'static str {
    FORMATS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(format))
        .copied()
        .unwrap_or("other")
}

/// Defines a label enum with its label values, so that each label is a closed set the
/// compiler checks and every series can be created (at zero) up front.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $value:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }
        }
    };
}

label_enum! {
    /// The routes of `serve`, by template, for `dsa_http_requests_total{route}`: a
    /// closed set, so a path full of ids cannot create series without end. The router
    /// is built from these, so a route cannot be served and go uncounted.
    HttpRoute {
        Datasets => "/v1/datasets",
        Dataset => "/v1/datasets/{name}",
        Commits => "/v1/datasets/{name}/commits",
        Diff => "/v1/datasets/{name}/diff",
        Export => "/v1/datasets/{name}/export",
        Imports => "/v1/datasets/{name}/imports",
        Run => "/v1/runs/{id}",
        RunEvents => "/v1/runs/{id}/events",
        OpenApi => "/v1/openapi.json",
        Healthz => "/healthz",
        Readyz => "/readyz",
        Metrics => "/metrics",
        /// No route matched: the router's own `404`.
        Unmatched => "unmatched",
    }
}

impl HttpRoute {
    /// The route of a matched path template; `Unmatched` for anything else.
    pub fn of_template(template: Option<&str>) -> Self {
        template
            .and_then(|template| {
                Self::ALL
                    .iter()
                    .find(|route| route.as_str() == template)
                    .copied()
            })
            .unwrap_or(Self::Unmatched)
    }
}

label_enum! {
    /// The class of an HTTP status, for `dsa_http_requests_total{status_class}`.
    StatusClass {
        Informational => "1xx",
        Success => "2xx",
        Redirection => "3xx",
        ClientError => "4xx",
        ServerError => "5xx",
    }
}

impl StatusClass {
    pub fn of(status: u16) -> Self {
        match status {
            0..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }
}

label_enum! {
    /// How an import run ended, for `dsa_import_runs_total{status}`.
    ImportStatus {
        Completed => "completed",
        /// The run was marked failed (a permanent error).
        Failed => "failed",
        /// A transient error; the run will be tried again.
        Retried => "retried",
    }
}

label_enum! {
    /// The size of an imported object, for `dsa_import_duration_seconds{size_class}`.
    /// The bounds are binary: `lt_1mb` is under 1 MiB.
    SizeClass {
        Lt1Mb => "lt_1mb",
        Lt100Mb => "lt_100mb",
        Lt1Gb => "lt_1gb",
        Ge1Gb => "ge_1gb",
    }
}

impl SizeClass {
    pub fn of(bytes: u64) -> Self {
        const MIB: u64 = 1 << 20;
        match bytes {
            bytes if bytes < MIB => SizeClass::Lt1Mb,
            bytes if bytes < 100 * MIB => SizeClass::Lt100Mb,
            bytes if bytes < 1024 * MIB => SizeClass::Lt1Gb,
            _ => SizeClass::Ge1Gb,
        }
    }
}

label_enum! {
    /// What the consumer did with a delivery, for `dsa_amqp_messages_total{outcome}`.
    AmqpOutcome {
        /// Done (imported, or failed for good and recorded on the run).
        Ack => "ack",
        /// A transient failure, retried with backoff (counted per retry; the delivery's
        /// settlement is counted again when it comes).
        Retry => "retry",
        /// Given up on and sent to the dead-letter exchange.
        DeadLetter => "dead_letter",
        /// Acknowledged without work: the run was finished already, or another worker
        /// took it over.
        Skipped => "skipped",
        /// Handed back to the broker unprocessed, as on shutdown.
        Requeue => "requeue",
    }
}

label_enum! {
    /// What the broker said to a publish, for `dsa_amqp_published_total{result}`.
    PublishResult {
        Confirmed => "confirmed",
        /// Unroutable: returned by the broker (mandatory flag).
        Returned => "returned",
        Nacked => "nacked",
    }
}

label_enum! {
    /// The S3 request made, for `dsa_s3_requests_total{operation}`.
    S3Operation {
        Head => "head",
        /// One ranged GET, including one that resumes a broken body.
        GetRange => "get_range",
        Put => "put",
        MultipartCreate => "multipart_create",
        MultipartUploadPart => "multipart_upload_part",
        MultipartComplete => "multipart_complete",
        MultipartAbort => "multipart_abort",
        /// One page of a bucket listing (`watch`).
        List => "list",
        /// An object deleted (`watch --after delete` or `move:`).
        Delete => "delete",
        /// An object copied (`watch --after move:`).
        Copy => "copy",
    }
}

label_enum! {
    /// How a search index refresh ended, for `dsa_search_refreshes_total{result}`.
    RefreshResult {
        Completed => "completed",
        Failed => "failed",
    }
}

label_enum! {
    /// What the sweeper did to an abandoned run, for `dsa_runs_swept_total{action}`.
    SweepAction {
        /// Its lease expired and no message held it: its reference was published again.
        Republished => "republished",
        /// Abandoned past `SWEEPER_ABANDONED_AFTER_SECONDS`: failed, commit removed.
        Failed => "failed",
    }
}

label_enum! {
    /// How one sweep ended, for `dsa_sweeps_total{outcome}`.
    SweepOutcome {
        /// The sweep looked at every run it should and did what they needed.
        Done => "done",
        /// Another maintainer was sweeping at that moment; this one let it.
        Skipped => "skipped",
        /// The database or the broker failed it; the next tick tries again.
        Failed => "failed",
    }
}

label_enum! {
    /// Why a run failed for good, for `dsa_import_failures_total{reason}`.
    FailureReason {
        /// The file is not what the run asked for: not CSV, a bad row, a missing key
        /// column, a sheet that does not exist, an object that does not exist.
        BadInput => "bad_input",
        /// Over a size limit: the object, a sheet, a cell, a record, the columns.
        TooLarge => "too_large",
        /// Refused as likely hostile: a zip bomb, XML entities, a sparse sheet.
        HostileFile => "hostile_file",
        /// The object was replaced or cut short while the run read it.
        ObjectChanged => "object_changed",
        /// The allow-lists or the object store refused the source.
        Refused => "refused",
        Other => "other",
    }
}

label_enum! {
    /// Why `watch` did not queue a listed object, for
    /// `dsa_watch_objects_skipped_total{reason}`.
    WatchSkip {
        /// A folder marker (a key ending in `/`).
        Folder => "folder",
        /// A hidden or temporary-looking name (`WATCH_IGNORE_PREFIXES`, `WATCH_IGNORE_SUFFIXES`).
        IgnoredName => "ignored_name",
        /// Not matched by the rule's pattern.
        Pattern => "pattern",
        /// Younger than `WATCH_SETTLE_SECONDS`; a later listing looks again.
        Unsettled => "unsettled",
        /// This version was seen before (queued already, or imported by an S3 event).
        Seen => "seen",
        /// Outside `IMPORT_ALLOWED_BUCKETS`.
        Refused => "refused",
        /// A run existed for this version already (an S3 event record named it).
        HasRun => "has_run",
    }
}

label_enum! {
    /// The queues whose depth `maintain` reports, for `dsa_amqp_queue_messages_ready{queue}`.
    QueueName {
        /// `AMQP_IMPORT_QUEUE`.
        Import => "import",
        /// `AMQP_DEAD_LETTER_QUEUE`.
        DeadLetter => "dead_letter",
    }
}

label_enum! {
    /// What `watch` did with an object after its run ended, for
    /// `dsa_watch_after_actions_total{action}`.
    WatchAfter {
        Deleted => "deleted",
        Moved => "moved",
        /// Left where it was: it had changed (a newer version) or was gone already.
        Left => "left",
    }
}

/// A listing of one rule takes milliseconds for a small prefix and minutes for a huge
/// one.
const WATCH_LISTING_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

label_enum! {
    /// Connection states, for `dsa_db_pool_connections{state}`.
    PoolState {
        InUse => "in_use",
        Idle => "idle",
    }
}

/// Every metric the process exports, with the registry that holds them.
pub struct Metrics {
    /// A registry of our own rather than the crate's default one, so unit tests can
    /// build a fresh `Metrics` and assert exact values.
    registry: Registry,
    import_runs: IntCounterVec,
    import_duration: HistogramVec,
    rows_processed: IntCounter,
    bytes_processed: IntCounter,
    rows_deduplicated: IntCounter,
    rows_rejected: IntCounter,
    batch_duration: prometheus::Histogram,
    imports_in_flight: IntGauge,
    amqp_messages: IntCounterVec,
    amqp_published: IntCounterVec,
    s3_requests: IntCounterVec,
    s3_retries: IntCounter,
    search_refreshes: IntCounterVec,
    search_refresh_duration: prometheus::Histogram,
    runs_swept: IntCounterVec,
    sweeps: IntCounterVec,
    waiters_released: IntCounter,
    import_failures: IntCounterVec,
    pool_acquire_duration: prometheus::Histogram,
    spool_used: IntGauge,
    queue_messages_ready: IntGaugeVec,
    outbox_unsent: IntGauge,
    outbox_oldest_age: Gauge,
    /// The work run before each scrape, if any (see [`Metrics::before_scrape`]).
    scrape_probe: Mutex<Option<ScrapeProbe>>,
    watch_listed: IntCounter,
    watch_queued: IntCounter,
    watch_skipped: IntCounterVec,
    watch_listing_duration: prometheus::Histogram,
    watch_oldest_unqueued: prometheus::Gauge,
    watch_active: IntGauge,
    watch_after_actions: IntCounterVec,
    http_requests: IntCounterVec,
    http_upload_bytes: IntCounter,
    http_uploads_in_flight: IntGauge,
    /// The gauges that are read from their source when the registry is gathered.
    scrape_time: ScrapeTimeGauges,
}

/// The process-wide metrics; created on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in a registry of its own. The process uses [`metrics()`];
    /// a second instance is for tests.
    pub fn new() -> Self {
        let registry = Registry::new();
        let import_runs = IntCounterVec::new(
            Opts::new(
                "dsa_import_runs_total",
                "Import runs that ended, by how they ended and the source's format.",
            ),
            &["status", "format"],
        )
        .expect("valid metric");
        let import_duration = HistogramVec::new(
            HistogramOpts::new(
                "dsa_import_duration_seconds",
                "Wall time of completed imports, by the object's size class.",
            )
            .buckets(IMPORT_DURATION_BUCKETS.to_vec()),
            &["size_class"],
        )
        .expect("valid metric");
        let rows_processed = IntCounter::new(
            "dsa_rows_processed_total",
            "Rows written to commits, counted as each batch transaction commits.",
        )
        .expect("valid metric");
        let bytes_processed = IntCounter::new(
            "dsa_bytes_processed_total",
            "Source bytes consumed by imports, counted as each batch transaction commits.",
        )
        .expect("valid metric");
        let rows_deduplicated = IntCounter::new(
            "dsa_rows_deduplicated_total",
            "Rows of completed imports whose content was stored already.",
        )
        .expect("valid metric");
        let rows_rejected = IntCounter::new(
            "dsa_rows_rejected_total",
            "Bad rows skipped and recorded by completed imports.",
        )
        .expect("valid metric");
        let batch_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "dsa_batch_duration_seconds",
                "Time of one committed batch transaction (COPY, commit_rows, checkpoint).",
            )
            .buckets(BATCH_DURATION_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let imports_in_flight = IntGauge::new(
            "dsa_imports_in_flight",
            "Imports running in this process now.",
        )
        .expect("valid metric");
        let amqp_messages = IntCounterVec::new(
            Opts::new(
                "dsa_amqp_messages_total",
                "Deliveries handled by the consumer, by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let amqp_published = IntCounterVec::new(
            Opts::new(
                "dsa_amqp_published_total",
                "Messages published, by what the broker answered.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let s3_requests = IntCounterVec::new(
            Opts::new(
                "dsa_s3_requests_total",
                "Requests sent to the object store, by operation.",
            ),
            &["operation"],
        )
        .expect("valid metric");
        let s3_retries = IntCounter::new(
            "dsa_s3_retries_total",
            "Ranged GETs sent again after a failure or a broken body.",
        )
        .expect("valid metric");
        let search_refreshes = IntCounterVec::new(
            Opts::new(
                "dsa_search_refreshes_total",
                "Refreshes of the search index (dsa_search.datasets_summary), by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let search_refresh_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "dsa_search_refresh_duration_seconds",
                "Time of one search index refresh.",
            )
            .buckets(SEARCH_REFRESH_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let runs_swept = IntCounterVec::new(
            Opts::new(
                "dsa_runs_swept_total",
                "Abandoned runs the sweeper in maintain republished or failed, by action.",
            ),
            &["action"],
        )
        .expect("valid metric");
        let sweeps = IntCounterVec::new(
            Opts::new(
                "dsa_sweeps_total",
                "Sweeps of the sweeper in maintain, by how they ended: a maintainer that sweeps shows done.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let waiters_released = IntCounter::new(
            "dsa_waiters_released_total",
            "Deliveries that stopped waiting for a run held elsewhere because their own channel closed.",
        )
        .expect("valid metric");
        let import_failures = IntCounterVec::new(
            Opts::new(
                "dsa_import_failures_total",
                "Runs that failed for good, by the source's format and a reason from a fixed list.",
            ),
            &["format", "reason"],
        )
        .expect("valid metric");
        let pool_acquire_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "dsa_db_pool_acquire_duration_seconds",
                "Time spent waiting for a connection of the database pool, where an import, a claim, \
                 the relay or the maintainer takes one for a transaction or a whole run.",
            )
            .buckets(POOL_ACQUIRE_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let spool_used = IntGauge::new(
            "dsa_spool_used_bytes",
            "Bytes in this process's spool files (spreadsheets being read) in IMPORT_SPOOL_DIR.",
        )
        .expect("valid metric");
        let queue_messages_ready = IntGaugeVec::new(
            Opts::new(
                "dsa_amqp_queue_messages_ready",
                "Messages ready in the import and dead-letter queues, as a passive declare \
                 found them (reported by maintain, cached for a few seconds).",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let outbox_unsent = IntGauge::new(
            "dsa_outbox_unsent_messages",
            "Rows of the outbox not yet published (reported by maintain).",
        )
        .expect("valid metric");
        let outbox_oldest_age = Gauge::new(
            "dsa_outbox_oldest_unsent_age_seconds",
            "Age of the oldest unsent outbox row; 0 when none (reported by maintain).",
        )
        .expect("valid metric");
        let watch_listed = IntCounter::new(
            "dsa_watch_objects_listed_total",
            "Objects watch listed (every listing counts each object it returns).",
        )
        .expect("valid metric");
        let watch_queued = IntCounter::new(
            "dsa_watch_objects_queued_total",
            "Objects watch created a run for and queued.",
        )
        .expect("valid metric");
        let watch_skipped = IntCounterVec::new(
            Opts::new(
                "dsa_watch_objects_skipped_total",
                "Listed objects watch did not queue, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let watch_listing_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "dsa_watch_listing_duration_seconds",
                "Time of one listing of one watch rule, every page and its records included.",
            )
            .buckets(WATCH_LISTING_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let watch_oldest_unqueued = prometheus::Gauge::new(
            "dsa_watch_oldest_unqueued_age_seconds",
            "Age of the oldest object the last listings saw but did not queue yet (0: none).",
        )
        .expect("valid metric");
        let watch_active = IntGauge::new(
            "dsa_watch_active",
            "1 while this watch replica is the lister, 0 while it stands by.",
        )
        .expect("valid metric");
        let watch_after_actions = IntCounterVec::new(
            Opts::new(
                "dsa_watch_after_actions_total",
                "Objects watch deleted, moved or left after their run ended.",
            ),
            &["action"],
        )
        .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "dsa_http_requests_total",
                "Requests serve answered, by route template and status class.",
            ),
            &["route", "status_class"],
        )
        .expect("valid metric");
        let http_upload_bytes = IntCounter::new(
            "dsa_http_upload_bytes_total",
            "Bytes of upload bodies serve received, kept or not.",
        )
        .expect("valid metric");
        let http_uploads_in_flight = IntGauge::new(
            "dsa_http_uploads_in_flight",
            "Uploads serve is receiving or storing now.",
        )
        .expect("valid metric");
        let scrape_time = ScrapeTimeGauges::new();

        // Every series of a closed label set exists from the start, at zero, so that a
        // rate() over the first failure sees it rise from 0 instead of appear.
        for status in ImportStatus::ALL {
            for format in FORMATS {
                import_runs.with_label_values(&[status.as_str(), format]);
            }
        }
        for size_class in SizeClass::ALL {
            import_duration.with_label_values(&[size_class.as_str()]);
        }
        for outcome in AmqpOutcome::ALL {
            amqp_messages.with_label_values(&[outcome.as_str()]);
        }
        for result in PublishResult::ALL {
            amqp_published.with_label_values(&[result.as_str()]);
        }
        for operation in S3Operation::ALL {
            s3_requests.with_label_values(&[operation.as_str()]);
        }
        for result in RefreshResult::ALL {
            search_refreshes.with_label_values(&[result.as_str()]);
        }
        for action in SweepAction::ALL {
            runs_swept.with_label_values(&[action.as_str()]);
        }
        for outcome in SweepOutcome::ALL {
            sweeps.with_label_values(&[outcome.as_str()]);
        }
        for format in FORMATS {
            for reason in FailureReason::ALL {
                import_failures.with_label_values(&[format, reason.as_str()]);
            }
        }
        for queue in QueueName::ALL {
            queue_messages_ready.with_label_values(&[queue.as_str()]);
        }
        for reason in WatchSkip::ALL {
            watch_skipped.with_label_values(&[reason.as_str()]);
        }
        for action in WatchAfter::ALL {
            watch_after_actions.with_label_values(&[action.as_str()]);
        }
        for route in HttpRoute::ALL {
            for class in StatusClass::ALL {
                http_requests.with_label_values(&[route.as_str(), class.as_str()]);
            }
        }

        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(import_runs.clone()),
            Box::new(import_duration.clone()),
            Box::new(rows_processed.clone()),
            Box::new(bytes_processed.clone()),
            Box::new(rows_deduplicated.clone()),
            Box::new(rows_rejected.clone()),
            Box::new(batch_duration.clone()),
            Box::new(imports_in_flight.clone()),
            Box::new(amqp_messages.clone()),
            Box::new(amqp_published.clone()),
            Box::new(s3_requests.clone()),
            Box::new(s3_retries.clone()),
            Box::new(search_refreshes.clone()),
            Box::new(search_refresh_duration.clone()),
            Box::new(runs_swept.clone()),
            Box::new(sweeps.clone()),
            Box::new(waiters_released.clone()),
            Box::new(import_failures.clone()),
            Box::new(pool_acquire_duration.clone()),
            Box::new(spool_used.clone()),
            Box::new(queue_messages_ready.clone()),
            Box::new(outbox_unsent.clone()),
            Box::new(outbox_oldest_age.clone()),
            Box::new(watch_listed.clone()),
            Box::new(watch_queued.clone()),
            Box::new(watch_skipped.clone()),
            Box::new(watch_listing_duration.clone()),
            Box::new(watch_oldest_unqueued.clone()),
            Box::new(watch_active.clone()),
            Box::new(watch_after_actions.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_upload_bytes.clone()),
            Box::new(http_uploads_in_flight.clone()),
            Box::new(scrape_time.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        // CPU time, resident and virtual memory, file descriptors and threads, read from
        // /proc on each scrape, under the standard names (`process_resident_memory_bytes`,
        // ...) that stock dashboards and alerts look for.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");

        Self {
            registry,
            import_runs,
            import_duration,
            rows_processed,
            bytes_processed,
            rows_deduplicated,
            rows_rejected,
            batch_duration,
            imports_in_flight,
            amqp_messages,
            amqp_published,
            s3_requests,
            s3_retries,
            search_refreshes,
            search_refresh_duration,
            runs_swept,
            sweeps,
            waiters_released,
            import_failures,
            pool_acquire_duration,
            spool_used,
            queue_messages_ready,
            outbox_unsent,
            outbox_oldest_age,
            scrape_probe: Mutex::new(None),
            watch_listed,
            watch_queued,
            watch_skipped,
            watch_listing_duration,
            watch_oldest_unqueued,
            watch_active,
            watch_after_actions,
            http_requests,
            http_upload_bytes,
            http_uploads_in_flight,
            scrape_time,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a completed import: its run, rows already stored, rejected rows, and its
    /// duration under the size class of the whole object. Its rows and bytes were
    /// counted batch by batch ([`Metrics::record_batch_loaded`]).
    pub fn record_import_finished(&self, import: &CompletedImport, format: &str) {
        self.record_import_run(ImportStatus::Completed, format);
        self.rows_deduplicated
            .inc_by(import.rows.saturating_sub(import.new_rows));
        self.rows_rejected.inc_by(import.rejected_rows);
        self.import_duration
            .with_label_values(&[SizeClass::of(import.object_bytes).as_str()])
            .observe(import.seconds);
    }

    /// Counts a run that failed for good, and why.
    pub fn record_import_failed(&self, format: &str, reason: FailureReason) {
        self.record_import_run(ImportStatus::Failed, format);
        self.import_failures
            .with_label_values(&[format_label(format), reason.as_str()])
            .inc();
    }

    /// Counts the rows and source bytes of a batch as its transaction commits, so that
    /// a long import moves `rate()` steadily rather than all at once when it ends.
    pub fn record_batch_loaded(&self, rows: u64, bytes: u64) {
        self.rows_processed.inc_by(rows);
        self.bytes_processed.inc_by(bytes);
    }

    /// Counts an attempt that ended in a transient error and will be tried again.
    pub fn record_import_retried(&self, format: &str) {
        self.record_import_run(ImportStatus::Retried, format);
    }

    pub fn record_import_run(&self, status: ImportStatus, format: &str) {
        self.import_runs
            .with_label_values(&[status.as_str(), format_label(format)])
            .inc();
    }

    /// Counts one answered request of `serve`.
    pub fn http_request(&self, route: HttpRoute, status: u16) {
        self.http_requests
            .with_label_values(&[route.as_str(), StatusClass::of(status).as_str()])
            .inc();
    }

    /// Counts bytes of an upload body as they arrive.
    pub fn http_upload_bytes(&self, bytes: u64) {
        self.http_upload_bytes.inc_by(bytes);
    }

    /// Counts an upload as in flight until the returned guard is dropped.
    pub fn http_upload_in_flight(&self) -> GaugeGuard {
        GaugeGuard::new(self.http_uploads_in_flight.clone())
    }

    /// Counts an import as in flight until the returned guard is dropped, however the
    /// import ends (including a panic or a cancelled future); its start time counts
    /// towards `dsa_import_oldest_start_time_seconds` as long.
    pub fn import_in_flight(&self) -> InFlightGuard {
        InFlightGuard::new(
            self.imports_in_flight.clone(),
            Arc::clone(&self.scrape_time.in_flight),
        )
    }

    /// Records how long a caller waited for a pooled connection.
    pub fn observe_pool_acquire(&self, waited: Duration) {
        self.pool_acquire_duration.observe(waited.as_secs_f64());
    }

    /// Counts `bytes` more in this process's spool files until the returned usage (and
    /// every later [`SpoolUsage::grow`]) is dropped with the file.
    pub fn spool_usage(&self) -> SpoolUsage {
        SpoolUsage {
            gauge: self.spool_used.clone(),
            bytes: 0,
        }
    }

    /// Makes `dsa_spool_filesystem_free_bytes` and `_size_bytes` report the file
    /// system that holds `dir`, read at each scrape.
    pub fn watch_spool_dir(&self, dir: &Path) {
        *self
            .scrape_time
            .spool_dir
            .lock()
            .expect("spool slot not poisoned") = Some(dir.to_owned());
    }

    /// Sets the depth of one of the queues `maintain` watches.
    pub fn set_queue_messages_ready(&self, queue: QueueName, messages: u32) {
        self.queue_messages_ready
            .with_label_values(&[queue.as_str()])
            .set(i64::from(messages));
    }

    /// Sets the outbox backlog: unsent rows and the oldest one's age (0 when none).
    pub fn set_outbox_backlog(&self, unsent: i64, oldest_age: Duration) {
        self.outbox_unsent.set(unsent);
        self.outbox_oldest_age.set(oldest_age.as_secs_f64());
    }

    /// Runs `probe` before each scrape (at most [`SCRAPE_PROBE_TIMEOUT`]), for values
    /// that take I/O to read, such as queue depths; the probe caches as it sees fit. A
    /// later call replaces the probe set before.
    pub fn before_scrape(&self, probe: ScrapeProbe) {
        *self.scrape_probe.lock().expect("probe slot not poisoned") = Some(probe);
    }

    /// Runs the probe set with [`Metrics::before_scrape`], if any; a probe that takes
    /// too long leaves the values it found last time.
    pub async fn run_scrape_probe(&self) {
        let probe = self
            .scrape_probe
            .lock()
            .expect("probe slot not poisoned")
            .clone();
        if let Some(probe) = probe {
            if tokio::time::timeout(SCRAPE_PROBE_TIMEOUT, probe())
                .await
                .is_err()
            {
                tracing::warn!(
                    timeout_ms = SCRAPE_PROBE_TIMEOUT.as_millis() as u64,
                    "the work before a scrape took too long; serving the values found last time"
                );
            }
        }
    }

    /// Records one committed batch transaction.
    pub fn observe_batch(&self, duration: Duration) {
        self.batch_duration.observe(duration.as_secs_f64());
    }

    pub fn amqp_outcome(&self, outcome: AmqpOutcome) {
        self.amqp_messages
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    pub fn amqp_published(&self, result: PublishResult) {
        self.amqp_published
            .with_label_values(&[result.as_str()])
            .inc();
    }

    pub fn s3_request(&self, operation: S3Operation) {
        self.s3_requests
            .with_label_values(&[operation.as_str()])
            .inc();
    }

    pub fn s3_retry(&self) {
        self.s3_retries.inc();
    }

    /// Records one refresh of the search index and how long it took.
    pub fn search_refresh(&self, result: RefreshResult, duration: Duration) {
        self.search_refreshes
            .with_label_values(&[result.as_str()])
            .inc();
        self.search_refresh_duration.observe(duration.as_secs_f64());
    }

    /// Counts runs the sweeper republished or failed.
    pub fn runs_swept(&self, action: SweepAction, count: u64) {
        self.runs_swept
            .with_label_values(&[action.as_str()])
            .inc_by(count);
    }

    /// Counts one sweep by how it ended.
    pub fn sweep_ended(&self, outcome: SweepOutcome) {
        self.sweeps.with_label_values(&[outcome.as_str()]).inc();
    }

    /// Counts a waiting delivery that gave its worker slot back when its channel closed.
    pub fn record_waiter_released(&self) {
        self.waiters_released.inc();
    }

    /// Counts objects one page of a `watch` listing returned.
    pub fn watch_listed(&self, objects: u64) {
        self.watch_listed.inc_by(objects);
    }

    /// Counts objects `watch` created a run for and queued.
    pub fn watch_queued(&self, objects: u64) {
        self.watch_queued.inc_by(objects);
    }

    pub fn watch_skipped(&self, reason: WatchSkip) {
        self.watch_skipped
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Records one listing of one rule.
    pub fn watch_listing(&self, duration: Duration) {
        self.watch_listing_duration.observe(duration.as_secs_f64());
    }

    /// The age of the oldest object seen but not queued (zero: none).
    pub fn watch_oldest_unqueued(&self, age: Duration) {
        self.watch_oldest_unqueued.set(age.as_secs_f64());
    }

    /// Whether this replica is the lister.
    pub fn watch_active(&self, active: bool) {
        self.watch_active.set(i64::from(active));
    }

    pub fn watch_after_action(&self, action: WatchAfter) {
        self.watch_after_actions
            .with_label_values(&[action.as_str()])
            .inc();
    }

    /// Makes `dsa_db_pool_connections` report this pool, read at each scrape. A later
    /// call replaces the pool watched before.
    pub fn watch_pool(&self, pool: &PgPool) {
        *self
            .scrape_time
            .pool
            .lock()
            .expect("pool slot not poisoned") = Some(pool.clone());
    }

    /// Every metric in the Prometheus text format.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub fn text_content_type() -> String {
    TextEncoder::new().format_type().to_owned()
}

/// The figures of a finished import that the metrics use. The import's own summary
/// converts into it, so the summary can grow without touching the metrics, and the
/// metrics know nothing of the import.
pub struct CompletedImport {
    pub rows: u64,
    pub new_rows: u64,
    pub rejected_rows: u64,
    pub object_bytes: u64,
    pub seconds: f64,
}

/// Work run before a scrape; see [`Metrics::before_scrape`].
pub type ScrapeProbe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> + Send + Sync>;

/// The start times of the imports in flight, by a number each guard draws.
#[derive(Default)]
struct InFlightStarts {
    next: AtomicU64,
    started: Mutex<HashMap<u64, SystemTime>>,
}

impl InFlightStarts {
    /// The oldest start time as Unix seconds, or 0 when nothing is in flight.
    fn oldest_unix_seconds(&self) -> f64 {
        self.started
            .lock()
            .expect("in-flight starts not poisoned")
            .values()
            .min()
            .and_then(|oldest| oldest.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |since| since.as_secs_f64())
    }
}

/// Holds `dsa_imports_in_flight` one higher, and its start time among the in-flight
/// ones, while it lives.
#[must_use = "the import counts as in flight only while the guard lives"]
pub struct InFlightGuard {
    gauge: IntGauge,
    starts: Arc<InFlightStarts>,
    number: u64,
}

impl InFlightGuard {
    fn new(gauge: IntGauge, starts: Arc<InFlightStarts>) -> Self {
        gauge.inc();
        let number = starts.next.fetch_add(1, Ordering::Relaxed);
        starts
            .started
            .lock()
            .expect("in-flight starts not poisoned")
            .insert(number, SystemTime::now());
        Self {
            gauge,
            starts,
            number,
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        if let Ok(mut started) = self.starts.started.lock() {
            started.remove(&self.number);
        }
    }
}

/// Holds a gauge (`dsa_http_uploads_in_flight`) one higher while it lives.
#[must_use = "the work counts as in flight only while the guard lives"]
pub struct GaugeGuard {
    gauge: IntGauge,
}

impl GaugeGuard {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Bytes of one spool file counted in `dsa_spool_used_bytes`; dropping it (with the
/// file) takes them off again.
#[must_use = "the bytes count only while the usage lives"]
pub struct SpoolUsage {
    gauge: IntGauge,
    bytes: u64,
}

impl SpoolUsage {
    /// Counts `bytes` more written to the file.
    pub fn grow(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.gauge.add(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

impl Drop for SpoolUsage {
    fn drop(&mut self) {
        self.gauge
            .sub(i64::try_from(self.bytes).unwrap_or(i64::MAX));
    }
}

/// Free and total bytes of the file system that holds `dir`.
#[cfg(unix)]
// The statvfs fields are 64 bits here and 32 on some other targets.
#[allow(clippy::unnecessary_cast)]
fn filesystem_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a valid NUL-terminated string and `stats` is writable memory of
    // the type statvfs fills.
    let status = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if status != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stats = unsafe { stats.assume_init() };
    let fragment = stats.f_frsize as u64;
    // f_bavail: what an unprivileged process may still use, which is what the spool gets.
    Ok((
        (stats.f_bavail as u64).saturating_mul(fragment),
        (stats.f_blocks as u64).saturating_mul(fragment),
    ))
}

#[cfg(not(unix))]
fn filesystem_space(_dir: &Path) -> std::io::Result<(u64, u64)> {
    Err(std::io::Error::other("not supported on this platform"))
}

/// Gauges whose values live elsewhere (the pool, the kernel): a collector that reads
/// them when the registry is gathered, so they are as fresh as the scrape.
#[derive(Clone)]
struct ScrapeTimeGauges {
    /// The pool `dsa_db_pool_connections` reports; none until [`Metrics::watch_pool`].
    pool: Arc<Mutex<Option<PgPool>>>,
    pool_connections: IntGaugeVec,
    pool_max_connections: IntGauge,
    peak_resident_memory: IntGauge,
    in_flight: Arc<InFlightStarts>,
    oldest_import_start: Gauge,
    /// The directory whose file system the spool gauges report; none until
    /// [`Metrics::watch_spool_dir`].
    spool_dir: Arc<Mutex<Option<PathBuf>>>,
    spool_free: IntGauge,
    spool_size: IntGauge,
}

impl ScrapeTimeGauges {
    fn new() -> Self {
        let pool_connections = IntGaugeVec::new(
            Opts::new(
                "dsa_db_pool_connections",
                "Connections of the database pool, by state (in_use, idle).",
            ),
            &["state"],
        )
        .expect("valid metric");
        for state in PoolState::ALL {
            pool_connections.with_label_values(&[state.as_str()]);
        }
        let pool_max_connections = IntGauge::new(
            "dsa_db_pool_max_connections",
            "The most connections the database pool opens.",
        )
        .expect("valid metric");
        let peak_resident_memory = IntGauge::new(
            "dsa_process_peak_resident_memory_bytes",
            "Highest resident memory of the process since it started.",
        )
        .expect("valid metric");
        let oldest_import_start = Gauge::new(
            "dsa_import_oldest_start_time_seconds",
            "Start time (Unix seconds) of the oldest import in flight in this process; 0 when none.",
        )
        .expect("valid metric");
        let spool_free = IntGauge::new(
            "dsa_spool_filesystem_free_bytes",
            "Bytes still free for the process on the file system of IMPORT_SPOOL_DIR.",
        )
        .expect("valid metric");
        let spool_size = IntGauge::new(
            "dsa_spool_filesystem_size_bytes",
            "Size of the file system of IMPORT_SPOOL_DIR.",
        )
        .expect("valid metric");
        Self {
            pool: Arc::new(Mutex::new(None)),
            pool_connections,
            pool_max_connections,
            peak_resident_memory,
            in_flight: Arc::new(InFlightStarts::default()),
            oldest_import_start,
            spool_dir: Arc::new(Mutex::new(None)),
            spool_free,
            spool_size,
        }
    }

    /// Every gauge, in the order of the output.
    fn gauges(&self) -> [&dyn Collector; 6] {
        [
            &self.pool_connections,
            &self.pool_max_connections,
            &self.peak_resident_memory,
            &self.oldest_import_start,
            &self.spool_free,
            &self.spool_size,
        ]
    }

    fn refresh(&self) {
        let pool = self.pool.lock().expect("pool slot not poisoned").clone();
        if let Some(pool) = pool {
            let size = i64::from(pool.size());
            let idle = pool.num_idle() as i64;
            self.pool_connections
                .with_label_values(&[PoolState::Idle.as_str()])
                .set(idle);
            // The two are read a moment apart; never report fewer than none in use.
            self.pool_connections
                .with_label_values(&[PoolState::InUse.as_str()])
                .set((size - idle).max(0));
            self.pool_max_connections
                .set(i64::from(pool.options().get_max_connections()));
        }
        self.oldest_import_start
            .set(self.in_flight.oldest_unix_seconds());
        let spool_dir = self
            .spool_dir
            .lock()
            .expect("spool slot not poisoned")
            .clone();
        if let Some(dir) = spool_dir {
            match filesystem_space(&dir) {
                Ok((free, size)) => {
                    self.spool_free.set(i64::try_from(free).unwrap_or(i64::MAX));
                    self.spool_size.set(i64::try_from(size).unwrap_or(i64::MAX));
                }
                Err(error) => {
                    tracing::debug!(dir = %dir.display(), error = %error, "reading the spool file system's space")
                }
            }
        }
        let peak = crate::process::peak_rss_bytes();
        self.peak_resident_memory
            .set(i64::try_from(peak).unwrap_or(i64::MAX));
    }
}

impl Collector for ScrapeTimeGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges()
            .into_iter()
            .flat_map(|gauge| gauge.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.gauges()
            .into_iter()
            .flat_map(|gauge| gauge.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(rows: u64, new_rows: u64, object_bytes: u64) -> CompletedImport {
        CompletedImport {
            rows,
            new_rows,
            rejected_rows: 2,
            object_bytes,
            seconds: 42.0,
        }
    }

    /// The value of the series `name{labels}` in the text output (labels as printed).
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} is not in the output"))
            .parse()
            .expect("a number")
    }

    #[test]
    fn size_classes_have_binary_bounds() {
        const MIB: u64 = 1 << 20;
        assert_eq!(SizeClass::of(0), SizeClass::Lt1Mb);
        assert_eq!(SizeClass::of(MIB - 1), SizeClass::Lt1Mb);
        assert_eq!(SizeClass::of(MIB), SizeClass::Lt100Mb);
        assert_eq!(SizeClass::of(100 * MIB - 1), SizeClass::Lt100Mb);
        assert_eq!(SizeClass::of(100 * MIB), SizeClass::Lt1Gb);
        assert_eq!(SizeClass::of(1024 * MIB - 1), SizeClass::Lt1Gb);
        assert_eq!(SizeClass::of(1024 * MIB), SizeClass::Ge1Gb);
        assert_eq!(SizeClass::of(u64::MAX), SizeClass::Ge1Gb);
        let names: Vec<_> = SizeClass::ALL.iter().map(|class| class.as_str()).collect();
        assert_eq!(names, ["lt_1mb", "lt_100mb", "lt_1gb", "ge_1gb"]);
    }

    #[test]
    fn formats_are_a_closed_set() {
        assert_eq!(format_label("csv"), "csv");
        assert_eq!(format_label("XLSX"), "xlsx");
        assert_eq!(format_label("parquet"), "other");
        assert_eq!(format_label(""), "other");
    }

    #[test]
    fn every_metric_is_exported_with_its_labels_at_zero() {
        let metrics = Metrics::new();
        let text = metrics.encode().unwrap();
        for name in [
            "dsa_import_runs_total",
            "dsa_import_duration_seconds",
            "dsa_rows_processed_total",
            "dsa_bytes_processed_total",
            "dsa_rows_deduplicated_total",
            "dsa_rows_rejected_total",
            "dsa_batch_duration_seconds",
            "dsa_imports_in_flight",
            "dsa_db_pool_connections",
            "dsa_amqp_messages_total",
            "dsa_amqp_published_total",
            "dsa_s3_requests_total",
            "dsa_s3_retries_total",
            "dsa_search_refreshes_total",
            "dsa_search_refresh_duration_seconds",
            "dsa_runs_swept_total",
            "dsa_sweeps_total",
            "dsa_waiters_released_total",
            "dsa_process_peak_resident_memory_bytes",
            "dsa_import_failures_total",
            "dsa_import_oldest_start_time_seconds",
            "dsa_db_pool_max_connections",
            "dsa_db_pool_acquire_duration_seconds",
            "dsa_spool_used_bytes",
            "dsa_spool_filesystem_free_bytes",
            "dsa_spool_filesystem_size_bytes",
            "dsa_amqp_queue_messages_ready",
            "dsa_outbox_unsent_messages",
            "dsa_outbox_oldest_unsent_age_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        #[cfg(target_os = "linux")]
        assert!(value(&text, "process_resident_memory_bytes") > 0.0);
        assert!(!text.contains("dsa_process_resident_memory_bytes"));
        assert_eq!(
            value(
                &text,
                "dsa_import_failures_total{format=\"ods\",reason=\"hostile_file\"}"
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_amqp_queue_messages_ready{queue=\"dead_letter\"}"
            ),
            0.0
        );
        assert_eq!(value(&text, "dsa_import_oldest_start_time_seconds"), 0.0);
        assert_eq!(value(&text, "dsa_spool_used_bytes"), 0.0);
        assert_eq!(value(&text, "dsa_outbox_oldest_unsent_age_seconds"), 0.0);
        assert!(value(&text, "dsa_process_peak_resident_memory_bytes") > 0.0);
        assert_eq!(
            value(
                &text,
                "dsa_import_runs_total{format=\"xlsb\",status=\"retried\"}"
            ),
            0.0
        );
        assert_eq!(
            value(&text, "dsa_amqp_messages_total{outcome=\"dead_letter\"}"),
            0.0
        );
        assert_eq!(
            value(&text, "dsa_amqp_published_total{result=\"returned\"}"),
            0.0
        );
        assert_eq!(
            value(&text, "dsa_s3_requests_total{operation=\"get_range\"}"),
            0.0
        );
        assert_eq!(
            value(&text, "dsa_search_refreshes_total{result=\"failed\"}"),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_duration_seconds_count{size_class=\"ge_1gb\"}"
            ),
            0.0
        );
        // No pool watched yet: the states exist, at zero.
        assert_eq!(
            value(&text, "dsa_db_pool_connections{state=\"in_use\"}"),
            0.0
        );
        assert!(text.contains("dsa_db_pool_connections{state=\"idle\"} 0"));
        assert!(text_content_type().starts_with("text/plain"));
    }

    #[test]
    fn a_finished_import_moves_the_run_level_counters() {
        let metrics = Metrics::new();
        metrics.record_batch_loaded(60, 1 << 20);
        metrics.record_batch_loaded(40, (4 << 20) - 10);
        metrics.record_import_finished(&completed(100, 30, 5 << 20), "csv");
        metrics.record_import_failed("xlsx", FailureReason::TooLarge);
        metrics.record_import_retried("something-new");
        let text = metrics.encode().unwrap();
        assert_eq!(
            value(
                &text,
                "dsa_import_runs_total{format=\"csv\",status=\"completed\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_runs_total{format=\"xlsx\",status=\"failed\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_runs_total{format=\"other\",status=\"retried\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_failures_total{format=\"xlsx\",reason=\"too_large\"}"
            ),
            1.0
        );
        assert_eq!(value(&text, "dsa_rows_processed_total"), 100.0);
        assert_eq!(value(&text, "dsa_rows_deduplicated_total"), 70.0);
        assert_eq!(value(&text, "dsa_rows_rejected_total"), 2.0);
        assert_eq!(
            value(&text, "dsa_bytes_processed_total"),
            ((5 << 20) - 10) as f64
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_duration_seconds_count{size_class=\"lt_100mb\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_duration_seconds_sum{size_class=\"lt_100mb\"}"
            ),
            42.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_duration_seconds_bucket{size_class=\"lt_100mb\",le=\"30\"}"
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "dsa_import_duration_seconds_bucket{size_class=\"lt_100mb\",le=\"60\"}"
            ),
            1.0
        );
    }

    #[test]
    fn helpers_count_what_they_name() {
        let metrics = Metrics::new();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        {
            let _first = metrics.import_in_flight();
            std::thread::sleep(Duration::from_millis(20));
            let _second = metrics.import_in_flight();
            let text = metrics.encode().unwrap();
            assert_eq!(value(&text, "dsa_imports_in_flight"), 2.0);
            // The first one's start, not the second's.
            let oldest = value(&text, "dsa_import_oldest_start_time_seconds");
            assert!(
                oldest >= before.floor() && oldest < before + 0.015,
                "{oldest}"
            );
            let mut spool = metrics.spool_usage();
            spool.grow(1000);
            spool.grow(24);
            let mut other = metrics.spool_usage();
            other.grow(1);
            drop(other);
            assert_eq!(
                value(&metrics.encode().unwrap(), "dsa_spool_used_bytes"),
                1024.0
            );
        }
        metrics.observe_pool_acquire(Duration::from_millis(3));
        metrics.set_queue_messages_ready(QueueName::Import, 7);
        metrics.set_outbox_backlog(3, Duration::from_secs(90));
        let spool_dir = tempfile::tempdir().unwrap();
        metrics.watch_spool_dir(spool_dir.path());
        metrics.observe_batch(Duration::from_millis(20));
        metrics.amqp_outcome(AmqpOutcome::DeadLetter);
        metrics.amqp_published(PublishResult::Confirmed);
        metrics.s3_request(S3Operation::Head);
        metrics.s3_retry();
        metrics.search_refresh(RefreshResult::Completed, Duration::from_millis(300));
        let text = metrics.encode().unwrap();
        assert_eq!(value(&text, "dsa_imports_in_flight"), 0.0);
        assert_eq!(value(&text, "dsa_import_oldest_start_time_seconds"), 0.0);
        assert_eq!(value(&text, "dsa_spool_used_bytes"), 0.0);
        assert_eq!(
            value(
                &text,
                "dsa_db_pool_acquire_duration_seconds_bucket{le=\"0.005\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&text, "dsa_amqp_queue_messages_ready{queue=\"import\"}"),
            7.0
        );
        assert_eq!(value(&text, "dsa_outbox_unsent_messages"), 3.0);
        assert_eq!(value(&text, "dsa_outbox_oldest_unsent_age_seconds"), 90.0);
        let free = value(&text, "dsa_spool_filesystem_free_bytes");
        let size = value(&text, "dsa_spool_filesystem_size_bytes");
        assert!(free > 0.0 && size >= free, "{free} of {size}");
        assert_eq!(value(&text, "dsa_batch_duration_seconds_count"), 1.0);
        assert_eq!(
            value(&text, "dsa_batch_duration_seconds_bucket{le=\"0.025\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "dsa_amqp_messages_total{outcome=\"dead_letter\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "dsa_amqp_published_total{result=\"confirmed\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "dsa_s3_requests_total{operation=\"head\"}"),
            1.0
        );
        assert_eq!(value(&text, "dsa_s3_retries_total"), 1.0);
        assert_eq!(
            value(&text, "dsa_search_refreshes_total{result=\"completed\"}"),
            1.0
        );
        assert_eq!(value(&text, "dsa_search_refresh_duration_seconds_sum"), 0.3);
    }

    #[test]
    fn label_values_are_distinct_snake_case() {
        let labels: [Vec<&str>; 9] = [
            FailureReason::ALL.iter().map(|v| v.as_str()).collect(),
            QueueName::ALL.iter().map(|v| v.as_str()).collect(),
            SweepAction::ALL.iter().map(|v| v.as_str()).collect(),
            ImportStatus::ALL.iter().map(|v| v.as_str()).collect(),
            AmqpOutcome::ALL.iter().map(|v| v.as_str()).collect(),
            PublishResult::ALL.iter().map(|v| v.as_str()).collect(),
            S3Operation::ALL.iter().map(|v| v.as_str()).collect(),
            RefreshResult::ALL.iter().map(|v| v.as_str()).collect(),
            PoolState::ALL.iter().map(|v| v.as_str()).collect(),
        ];
        for values in &labels {
            let distinct: std::collections::HashSet<&&str> = values.iter().collect();
            assert_eq!(distinct.len(), values.len(), "repeated value in {values:?}");
            for value in values {
                assert!(
                    value
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{value}"
                );
            }
        }
        assert_eq!(
            AmqpOutcome::ALL
                .iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>(),
            ["ack", "retry", "dead_letter", "skipped", "requeue"]
        );
        assert_eq!(
            FailureReason::ALL
                .iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>(),
            [
                "bad_input",
                "too_large",
                "hostile_file",
                "object_changed",
                "refused",
                "other"
            ]
        );
    }
}
