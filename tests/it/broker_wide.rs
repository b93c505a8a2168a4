//! Tests that change a shared service for everyone: a lowered `consumer_timeout`, a
//! broker restart, a PostgreSQL restart. Each runs alone (`spawn_app_alone`): it starts
//! once every other test has finished with the services, and no other test starts
//! until it is done.

use std::process::Command;
use std::time::Duration;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app_alone, wait_until};
use crate::process::{
    attempts, import_caught_mid_file, pending_run, reference, slow_endpoint, status_of, Consumer,
};

fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Sets a setting of the running broker and puts the old value back when dropped.
struct BrokerSetting {
    key: &'static str,
    old: String,
}

impl BrokerSetting {
    fn set(key: &'static str, value: u64) -> Self {
        let old = rabbitmqctl(&["eval", &format!("application:get_env(rabbit, {key}).")]);
        // `{ok,1800000}` -> `1800000`.
        let old = old
            .trim()
            .trim_start_matches("{ok,")
            .trim_end_matches('}')
            .to_owned();
        rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, {key}, {value})."),
        ]);
        Self { key, old }
    }
}

impl Drop for BrokerSetting {
    fn drop(&mut self) {
        if self.old.parse::<u64>().is_ok() {
            rabbitmqctl(&[
                "eval",
                &format!("application:set_env(rabbit, {}, {}).", self.key, self.old),
            ]);
        } else {
            rabbitmqctl(&[
                "eval",
                &format!("application:unset_env(rabbit, {}).", self.key),
            ]);
        }
    }
}

#[tokio::test]
async fn an_import_longer_than_the_consumer_timeout_completes_exactly_once() {
    let app = spawn_app_alone().await;
    // Channels opened from now on time out unacknowledged deliveries after 2 s, checked
    // every 500 ms (the defaults are 30 minutes and a minute).
    let _timeout = BrokerSetting::set("consumer_timeout", 2_000);
    let _tick = BrokerSetting::set("channel_tick_interval", 500);
    let broker = TestBroker::new().await;
    let run_id = pending_run(&app, "long", "long.csv", 30_000, 77).await;
    // About 3 MB at 400 kB/s: the import outlasts the timeout several times over.
    let slow = slow_endpoint(400_000).await;
    let consumer = Consumer::start(&app, &broker, &[("S3_ENDPOINT", slow.as_str())]);
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;

    wait_until(Duration::from_secs(120), "the run to complete", || async {
        status_of(&app, run_id).await == "completed"
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "the message to be settled",
        || async { broker.waiting().await == 0 && consumer.log().contains("nothing to do") },
    )
    .await;
    let log = consumer.log();
    assert!(
        log.contains("reconnecting"),
        "the broker never timed the delivery out:\n{log}"
    );
    assert_eq!(
        attempts(&app, run_id).await,
        1,
        "the import was started more than once"
    );
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_eq!(app.count("dsa_core.commit_rows").await, 30_000);
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn a_broker_restart_mid_import_is_survived_and_the_import_completes_once() {
    let app = spawn_app_alone().await;
    let broker = TestBroker::new().await;
    let (consumer, run_id) =
        import_caught_mid_file(&app, &broker, "long", "restart.csv", 30_000, 77).await;

    // The whole broker application stops and starts again: every connection drops,
    // and the durable quorum queue comes back with the unacknowledged message.
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    wait_until(Duration::from_secs(120), "the run to complete", || async {
        status_of(&app, run_id).await == "completed"
    })
    .await;
    // The test's own connection died with the broker; a new one looks at the queue.
    let observer = TestBroker::attach(broker.settings.clone()).await;
    wait_until(
        Duration::from_secs(60),
        "the redelivered message to be settled",
        || async {
            observer.queue_state(&broker.settings.import_queue).await == (0, 1)
                && consumer.log().contains("nothing to do")
        },
    )
    .await;
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_eq!(app.count("dsa_core.commit_rows").await, 30_000);

    // And the consumer subscribed again: new work is taken.
    let next = pending_run(&app, "long", "after-restart.csv", 500, 78).await;
    observer.publish_json(&reference(next)).await;
    wait_until(
        Duration::from_secs(60),
        "the next run to complete",
        || async { status_of(&app, next).await == "completed" },
    )
    .await;
}

/// Restarts the machine's PostgreSQL cluster, as the project's scripts start it.
fn restart_postgresql() {
    let versions = std::fs::read_dir("/etc/postgresql").expect("a PostgreSQL cluster");
    let version = versions
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a PostgreSQL version");
    let output = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .output()
        .expect("run pg_ctlcluster");
    assert!(
        output.status.success(),
        "pg_ctlcluster restart: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_postgresql_restart_mid_import_costs_a_retry_not_a_row() {
    let app = spawn_app_alone().await;
    let broker = TestBroker::new().await;
    let (consumer, run_id) =
        import_caught_mid_file(&app, &broker, "long", "pg-restart.csv", 30_000, 79).await;

    // Every connection of the consumer (its import's, its lease renewer's, its pool's)
    // dies with the server.
    restart_postgresql();
    wait_until(
        Duration::from_secs(60),
        "PostgreSQL to accept connections",
        || async { sqlx::PgPool::connect(&app.database_url).await.is_ok() },
    )
    .await;

    wait_until(Duration::from_secs(180), "the run to complete", || async {
        status_of(&app, run_id).await == "completed"
    })
    .await;
    let file = dsa_ingest::sample::sample_csv(30_000, 79);
    crate::faults::assert_commit_is_the_file(&app, run_id, &file, "pg-restart").await;
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_eq!(app.count("dsa_core.commit_rows").await, 30_000);
    assert_eq!(
        app.count("dsa_core.commits WHERE committed_at IS NULL")
            .await,
        0
    );
    wait_until(
        Duration::from_secs(60),
        "the message to be settled",
        || async { broker.queue_state(&broker.settings.import_queue).await == (0, 1) },
    )
    .await;
    assert_eq!(broker.dead_letters().await, 0);
    drop(consumer);
}
