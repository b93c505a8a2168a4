//! The outbox relay and `dsa-ingest maintain` against the real broker and database.
//! Every test declares its own maintenance exchange and queue (deleted at the end), so
//! tests run in parallel beside each other and beside a running deployment.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsa_ingest::config::MaintenanceSettings;
use dsa_ingest::outbox::MaintenanceRequest;
use dsa_ingest::queue::maintain::{self, MaintainStats};
use dsa_ingest::queue::relay;
use dsa_ingest::sample::sample_csv;
use dsa_ingest::shutdown::CancellationToken;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, wait_until, TestApp};

/// How long any awaited condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// What these tests do with the test's broker topology beyond `broker.rs`.
impl TestBroker {
    /// Publishes `count` requests without waiting for each confirm in turn (a burst),
    /// then waits until the broker confirmed every one.
    async fn publish_burst(&self, count: usize, dataset_id: i64) {
        let body = serde_json::to_vec(&MaintenanceRequest {
            dataset_id: Some(dataset_id),
            ..MaintenanceRequest::refresh_search_index()
        })
        .unwrap();
        self.publish_bodies(std::iter::repeat_n(body, count)).await;
    }

    async fn publish_bodies(&self, bodies: impl IntoIterator<Item = Vec<u8>>) {
        let mut confirms = Vec::new();
        for body in bodies {
            let confirm = self
                .channel
                .basic_publish(
                    self.settings.maintenance_exchange.as_str().into(),
                    self.settings.maintenance_routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    BasicProperties::default()
                        .with_content_type(ShortString::from("application/json"))
                        .with_delivery_mode(2),
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert_eq!(confirm.await.expect("confirm"), Confirmation::Ack(None));
        }
    }

    /// Takes one message from the queue on a consumer of its own, acknowledges it and
    /// closes the consumer. (A queue with a single active consumer refuses basic.get.)
    async fn receive_one(&self) -> Delivery {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .expect("prefetch");
        let mut consumer = channel
            .basic_consume(
                self.settings.maintenance_queue.as_str().into(),
                "test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("a message arrives")
            .expect("the subscription is open")
            .expect("a delivery");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        channel.close(200, "received".into()).await.expect("close");
        delivery
    }

    /// Messages ready in the queue (delivered but unacknowledged ones are not counted).
    async fn ready_messages(&self) -> u32 {
        self.channel
            .queue_declare(
                self.settings.maintenance_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("look at the queue")
            .message_count()
    }
}

/// A `dsa-ingest maintain` child process and the log lines it has written so far.
/// Dropping it kills the process.
struct ChildMaintainer {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ChildMaintainer {
    fn spawn(app: &TestApp, broker: &TestBroker) -> Self {
        let settings = &broker.settings;
        let mut child = tokio::process::Command::from(app.child())
            .arg("maintain")
            .env("AMQP_URL", settings.url.expose())
            .env("AMQP_MAINTENANCE_EXCHANGE", &settings.maintenance_exchange)
            .env("AMQP_MAINTENANCE_QUEUE", &settings.maintenance_queue)
            .env(
                "AMQP_MAINTENANCE_ROUTING_KEY",
                &settings.maintenance_routing_key,
            )
            .env("MAINTENANCE_COALESCE_MS", "1000")
            .env("RUST_LOG", "warn,dsa_ingest=info")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start dsa-ingest maintain");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn consuming(&self) -> bool {
        self.log().contains("consuming maintenance requests")
    }

    /// The `requests=` field of every "search index refreshed" line: one entry per
    /// refresh whose requests were acknowledged.
    fn refreshes(&self) -> Vec<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("search index refreshed requests="))
            .map(|line| {
                let (_, after) = line.split_once("requests=").unwrap();
                let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().expect("a request count")
            })
            .collect()
    }

    fn refreshed_requests(&self) -> u64 {
        self.refreshes().iter().sum()
    }

    /// SIGTERM, then the exit status.
    async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().expect("still running") as libc::pid_t;
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("maintain did not stop on SIGTERM:\n{}", self.log()))
            .expect("wait for maintain")
    }

    /// SIGKILL: the process gets no chance to close anything.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill maintain");
    }
}

/// Waits for `condition`, printing the maintainers' logs if it never holds.
async fn wait_for(
    maintainers: &[&ChildMaintainer],
    what: &str,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        if Instant::now() > deadline {
            let logs: Vec<String> = maintainers.iter().map(|m| m.log()).collect();
            panic!(
                "timed out waiting for {what}; logs:\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The head commit the search view shows for the dataset, if it shows the dataset.
async fn view_head(app: &TestApp, dataset_id: i64) -> Option<String> {
    sqlx::query_scalar(
        "SELECT head_commit_id FROM dsa_search.datasets_summary WHERE dataset_id = $1",
    )
    .bind(dataset_id)
    .fetch_optional(&app.pool)
    .await
    .expect("read the search view")
    .flatten()
}

#[tokio::test]
async fn the_relay_publishes_an_outbox_row_once_and_marks_it_sent() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("relay.csv", sample_csv(20, 1)).await;
    let summary = app.import("relay", "relay.csv").await;
    assert_eq!(app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await, 1);

    let (_connection, channel) = relay::open(&broker.settings).await.expect("open relay");
    let published = relay::relay_once(&app.pool, &channel, &broker.settings)
        .await
        .expect("relay");

    assert_eq!(published, 1);
    let message = broker.receive_one().await;
    let body: serde_json::Value = serde_json::from_slice(&message.data).unwrap();
    assert_eq!(
        body,
        json!({
            "task": "refresh_search_index",
            "dataset_id": summary.dataset_id,
            "commit_id": summary.commit_id,
        })
    );
    MaintenanceRequest::parse(&message.data).expect("the body follows the schema");
    let outbox_id: i64 = sqlx::query_scalar("SELECT id FROM dsa_jobs.outbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        message
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some(format!("outbox-{outbox_id}").as_str())
    );
    assert_eq!(app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await, 0);

    let again = relay::relay_once(&app.pool, &channel, &broker.settings)
        .await
        .expect("relay again");
    assert_eq!(again, 0);
    assert_eq!(broker.ready_messages().await, 0);
}

#[tokio::test]
async fn two_relays_at_once_publish_every_row_exactly_once() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    sqlx::query(
        "INSERT INTO dsa_jobs.outbox (exchange, routing_key, payload)
         SELECT 'dsa.maintenance', 'refresh_search_index',
                jsonb_build_object('task', 'refresh_search_index', 'dataset_id', n)
           FROM generate_series(1, 250) AS n",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    let (_firstconnection, first) = relay::open(&broker.settings).await.unwrap();
    let (_secondconnection, second) = relay::open(&broker.settings).await.unwrap();
    let (one, two) = tokio::join!(
        relay::relay_once(&app.pool, &first, &broker.settings),
        relay::relay_once(&app.pool, &second, &broker.settings),
    );

    assert_eq!(one.unwrap() + two.unwrap(), 250);
    assert_eq!(broker.ready_messages().await, 250);
    assert_eq!(app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await, 0);
}

#[tokio::test]
async fn a_burst_of_requests_gives_a_handful_of_refreshes() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("burst.csv", sample_csv(20, 2)).await;
    let summary = app.import("burst", "burst.csv").await;
    // The view was filled when the schema was created, before the dataset existed.
    assert_eq!(view_head(&app, summary.dataset_id).await, None);

    let maintainer = ChildMaintainer::spawn(&app, &broker);
    wait_for(&[&maintainer], "maintain to subscribe", || {
        maintainer.consuming()
    })
    .await;
    // Ten groups of ten, 40 ms apart: requests keep arriving for about 400 ms, as when
    // many imports finish one after another, rather than all landing at once. The
    // interval paces the publisher; nothing here waits for the maintainer.
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(40));
    for _ in 0..10 {
        pace.tick().await;
        broker.publish_burst(10, summary.dataset_id).await;
    }
    let published_ms = started.elapsed().as_millis();
    assert!(published_ms < 1000, "publishing took {published_ms} ms");

    // 100 requests plus the one the maintainer's relay takes from the import's outbox.
    wait_for(&[&maintainer], "all 101 requests to be refreshed", || {
        maintainer.refreshed_requests() == 101
    })
    .await;
    let refreshed_ms = started.elapsed().as_millis();
    assert_eq!(
        view_head(&app, summary.dataset_id).await.as_deref(),
        Some(summary.commit_id.as_str())
    );
    assert_eq!(app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await, 0);
    let refreshes = maintainer.refreshes();
    eprintln!(
        "100 requests published in {published_ms} ms, all refreshed after {refreshed_ms} ms \
         by {} refreshes covering {refreshes:?} requests",
        refreshes.len()
    );
    assert!(
        refreshes.len() <= 5,
        "{} refreshes for 101 requests: {refreshes:?}",
        refreshes.len()
    );

    let status = maintainer.terminate().await;
    assert!(status.success(), "maintain exited with {status}");
    // Every request was acknowledged: nothing came back to the queue when it closed.
    assert_eq!(broker.ready_messages().await, 0);
}

#[tokio::test]
async fn a_standby_maintainer_takes_over_when_the_active_one_is_killed() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let first = ChildMaintainer::spawn(&app, &broker);
    let second = ChildMaintainer::spawn(&app, &broker);
    wait_for(&[&first, &second], "both maintainers to subscribe", || {
        first.consuming() && second.consuming()
    })
    .await;

    broker.publish_burst(10, 1).await;
    wait_for(
        &[&first, &second],
        "the first 10 requests to be refreshed",
        || first.refreshed_requests() + second.refreshed_requests() == 10,
    )
    .await;
    let (active, standby) = if first.refreshed_requests() > 0 {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(
        standby.refreshed_requests(),
        0,
        "with a single active consumer only one maintainer refreshes"
    );

    active.kill().await;
    let started = Instant::now();
    app.put("later.csv", sample_csv(20, 3)).await;
    let summary = app.import("later", "later.csv").await;
    broker.publish_burst(10, summary.dataset_id).await;
    // The view shows a dataset imported after the kill, so the standby refreshed it.
    let deadline = Instant::now() + PATIENCE;
    while view_head(&app, summary.dataset_id).await.as_deref() != Some(summary.commit_id.as_str())
        || standby.refreshed_requests() < 10
    {
        assert!(
            Instant::now() < deadline,
            "the standby did not take over; its log:\n{}",
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "standby refreshed {} requests {} ms after the active maintainer was killed",
        standby.refreshed_requests(),
        started.elapsed().as_millis()
    );

    let status = standby.terminate().await;
    assert!(status.success(), "maintain exited with {status}");
    assert_eq!(broker.ready_messages().await, 0);
}

#[tokio::test]
async fn a_body_that_is_not_a_request_is_dropped_and_the_rest_refreshed() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("odd.csv", sample_csv(20, 4)).await;
    let summary = app.import("odd", "odd.csv").await;
    let stop = CancellationToken::new();
    let maintainer = tokio::spawn(maintain::run(
        app.pool.clone(),
        broker.settings.clone(),
        MaintenanceSettings {
            coalesce_window: Duration::from_millis(300),
            ..MaintenanceSettings::default()
        },
        None,
        stop.clone(),
    ));

    broker
        .publish_bodies([
            b"not json".to_vec(),
            br#"{"task": "vacuum_everything"}"#.to_vec(),
            serde_json::to_vec(&MaintenanceRequest::refresh_search_index()).unwrap(),
        ])
        .await;
    // Deliveries are handled in order, so once the valid request's refresh shows, the
    // two bodies before it have been settled.
    wait_until(PATIENCE, "the refresh", || async {
        view_head(&app, summary.dataset_id).await.as_deref() == Some(summary.commit_id.as_str())
    })
    .await;
    stop.cancel();
    let stats = maintainer.await.expect("maintainer task");

    assert_eq!(
        stats,
        MaintainStats {
            refreshes: 1,
            requests: 1
        }
    );
    // Rejected without requeue: not back in the queue after the maintainer closed.
    assert_eq!(broker.ready_messages().await, 0);
}

/// Closes the broker connection the child opened for `role`, as a broker restart or a
/// network cut would, using `rabbitmqctl` (the broker is local to the tests).
fn close_broker_connection(child: &ChildMaintainer, role: &str) {
    let pid = child.child.id().expect("still running");
    let listing = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("run rabbitmqctl list_connections");
    assert!(
        listing.status.success(),
        "rabbitmqctl list_connections failed"
    );
    let listing = String::from_utf8(listing.stdout).unwrap();
    // RabbitMQ 3.10 shows the connection name only among the client properties, as
    // {"connection_name","maintain dsa-ingest@host/boot:pid"}.
    let is_ours = |properties: &str| {
        properties
            .split_once("{\"connection_name\",\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .is_some_and(|(name, _)| {
                name.starts_with(&format!("{role} ")) && name.ends_with(&format!(":{pid}"))
            })
    };
    let connection = listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(_, properties)| is_ours(properties))
        .map(|(connection, _)| connection.to_owned())
        .unwrap_or_else(|| panic!("no {role} connection of process {pid} in:\n{listing}"));
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &connection, "closed by a test"])
        .output()
        .expect("run rabbitmqctl close_connection");
    assert!(
        closed.status.success(),
        "rabbitmqctl close_connection failed"
    );
}

#[tokio::test]
async fn a_maintainer_reconnects_after_losing_the_broker() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let maintainer = ChildMaintainer::spawn(&app, &broker);
    wait_for(&[&maintainer], "maintain to subscribe", || {
        maintainer.consuming()
    })
    .await;

    close_broker_connection(&maintainer, "maintain");
    wait_for(&[&maintainer], "maintain to subscribe again", || {
        maintainer
            .log()
            .matches("consuming maintenance requests")
            .count()
            == 2
    })
    .await;
    broker.publish_burst(5, 1).await;
    wait_for(&[&maintainer], "the requests to be refreshed", || {
        maintainer.refreshed_requests() == 5
    })
    .await;

    let status = maintainer.terminate().await;
    assert!(status.success(), "maintain exited with {status}");
    assert_eq!(broker.ready_messages().await, 0);
}

#[tokio::test]
async fn a_failed_refresh_requeues_its_requests_and_succeeds_later() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    // The refresh fails while the view cannot be found, as it would with the
    // database away, but without taking a shared server down.
    sqlx::query(
        "ALTER MATERIALIZED VIEW dsa_search.datasets_summary RENAME TO datasets_summary_away",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let maintainer = ChildMaintainer::spawn(&app, &broker);
    wait_for(&[&maintainer], "maintain to subscribe", || {
        maintainer.consuming()
    })
    .await;

    broker.publish_burst(3, 1).await;
    wait_for(&[&maintainer], "a failed refresh", || {
        maintainer.log().contains("search index refresh failed")
    })
    .await;
    assert_eq!(maintainer.refreshed_requests(), 0);
    sqlx::query(
        "ALTER MATERIALIZED VIEW dsa_search.datasets_summary_away RENAME TO datasets_summary",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    wait_for(
        &[&maintainer],
        "the requeued requests to be refreshed",
        || maintainer.refreshed_requests() == 3,
    )
    .await;

    let status = maintainer.terminate().await;
    assert!(status.success(), "maintain exited with {status}");
    assert_eq!(broker.ready_messages().await, 0);
}
