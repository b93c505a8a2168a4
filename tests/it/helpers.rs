//! Test scaffolding: every test gets its own database and its own bucket on the real
//! local services, so tests run in parallel and leave nothing behind.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use dsa_ingest::config::{ImportSettings, S3Settings};
use dsa_ingest::db::DatasetName;
use dsa_ingest::import::run::ImportParameters;
use dsa_ingest::import::run::SourceLocation;
use dsa_ingest::import::{ImportError, ImportSummary, Importer};
use sqlx::PgPool;
use uuid::Uuid;

/// Connection settings: the environment first, then the file `scripts/services` writes.
pub fn service_settings() -> HashMap<String, String> {
    let home = std::env::var("DSA_DEV_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set"))
                .join(".local/share/dsa-ingest-dev")
        });
    let path = home.join("services.env");
    let mut settings: HashMap<String, String> = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| {
            panic!(
                "{} is missing ({error}): run scripts/services first",
                path.display()
            )
        })
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    for key in [
        "DATABASE_ADMIN_URL",
        "S3_ENDPOINT",
        "S3_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        if let Ok(value) = std::env::var(key) {
            settings.insert(key.to_owned(), value);
        }
    }
    settings
}

/// One test's world: a fresh database with the schema, a fresh bucket, and the
/// settings a child `dsa-ingest` process needs to reach both.
pub struct TestApp {
    pub pool: PgPool,
    pub s3: aws_sdk_s3::Client,
    pub bucket: String,
    pub database_url: String,
    database_name: String,
    admin_url: String,
    services: HashMap<String, String>,
    /// This test's turn on the broker (a guard of [`BROKER_TURNS`], shared or alone),
    /// held for as long as the test's world lives.
    _turn: Box<dyn std::any::Any + Send + Sync>,
}

/// Tests that change the broker for everyone (a lowered `consumer_timeout`, a
/// restart) run alone: every other test holds this lock shared for as long as its
/// [`TestApp`] lives, and those take it exclusively (see [`spawn_app_alone`]).
static BROKER_TURNS: std::sync::LazyLock<std::sync::Arc<tokio::sync::RwLock<()>>> =
    std::sync::LazyLock::new(Default::default);

/// A fresh database and bucket, sharing the broker with the other tests.
pub async fn spawn_app() -> TestApp {
    build_app(Box::new(BROKER_TURNS.clone().read_owned().await)).await
}

/// A fresh database and bucket for a test that changes the broker for everyone: it
/// starts once every other test has finished with the broker, and none starts until
/// it is done.
pub async fn spawn_app_alone() -> TestApp {
    build_app(Box::new(BROKER_TURNS.clone().write_owned().await)).await
}

async fn build_app(turn: Box<dyn std::any::Any + Send + Sync>) -> TestApp {
    let services = service_settings();
    let admin_url = services["DATABASE_ADMIN_URL"].clone();
    let template = migrated_template(&admin_url).await;
    let database_name = format!("dsa_test_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url).await.expect("connect as admin");
    sqlx::query(&format!(
        "CREATE DATABASE {database_name} TEMPLATE {template}"
    ))
    .execute(&admin)
    .await
    .expect("create test database");
    admin.close().await;
    let database_url = database_url_for(&admin_url, &database_name);
    let pool = dsa_ingest::db::connect(&database_url, 8)
        .await
        .expect("connect to test db");

    export_credentials(&services);
    let s3 = dsa_ingest::s3::client(&s3_settings(&services)).await;
    let bucket = format!("dsa-test-{}", &Uuid::new_v4().simple().to_string()[..16]);
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create test bucket");

    TestApp {
        pool,
        s3,
        bucket,
        database_url,
        database_name,
        admin_url,
        services,
        _turn: turn,
    }
}

fn database_url_for(admin_url: &str, database_name: &str) -> String {
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("admin URL ends in a database name");
    format!("{base}/{database_name}")
}

/// A database with every migration applied, from which each test's database is copied
/// (`CREATE DATABASE ... TEMPLATE`), so the migrations run once, not once per test.
/// Its name carries a hash of the migration files: a changed migration gets a new
/// template, and test runs that share a server share an up-to-date one. It is built
/// under a name of its own and renamed when complete, so a run killed midway never
/// leaves a half-migrated template behind under the shared name.
async fn migrated_template(admin_url: &str) -> String {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            use sha2::{Digest, Sha256};
            let mut digest = Sha256::new();
            let mut files: Vec<PathBuf> =
                std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
                    .expect("read migrations/")
                    .map(|entry| entry.unwrap().path())
                    .collect();
            files.sort();
            for file in files {
                digest.update(file.file_name().unwrap().as_encoded_bytes());
                digest.update(std::fs::read(&file).unwrap());
            }
            let name = format!("dsa_template_{}", &hex::encode(digest.finalize())[..16]);
            let admin = PgPool::connect(admin_url).await.expect("connect as admin");
            let exists: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                    .bind(&name)
                    .fetch_optional(&admin)
                    .await
                    .expect("look for the template");
            if exists.is_none() {
                let building = format!("{name}_{}", &Uuid::new_v4().simple().to_string()[..8]);
                sqlx::query(&format!("CREATE DATABASE {building}"))
                    .execute(&admin)
                    .await
                    .expect("create the template database");
                let pool = dsa_ingest::db::connect(&database_url_for(admin_url, &building), 1)
                    .await
                    .expect("connect to the template database");
                dsa_ingest::db::migrate(&pool)
                    .await
                    .expect("migrate the template database");
                pool.close().await;
                let renamed = sqlx::query(&format!("ALTER DATABASE {building} RENAME TO {name}"))
                    .execute(&admin)
                    .await;
                if renamed.is_err() {
                    // Another test run finished the same template first; use theirs.
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {building}"))
                        .execute(&admin)
                        .await;
                }
            }
            admin.close().await;
            name
        })
        .await
        .clone()
}

/// The S3 SDK reads credentials from the environment. They are set once, before any
/// test reads the environment, since setting variables while other threads read them
/// is undefined behaviour.
fn export_credentials(services: &HashMap<String, String>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (key, value) in services {
            if key.starts_with("AWS_") {
                // SAFETY: inside call_once, every other test waits here before it
                // builds a client; nothing else in the tests writes the environment.
                unsafe { std::env::set_var(key, value) };
            }
        }
    });
}

fn s3_settings(services: &HashMap<String, String>) -> S3Settings {
    S3Settings {
        endpoint: services.get("S3_ENDPOINT").cloned(),
        region: services
            .get("S3_REGION")
            .cloned()
            .unwrap_or_else(|| "garage".into()),
        bucket: None,
    }
}

/// Small batches and ranges, so that even small test files cross many of each.
pub fn test_settings() -> ImportSettings {
    ImportSettings {
        batch_size: 100,
        chunk_size: 4096,
        fetch_concurrency: 3,
        progress_update_interval: 2,
        max_file_size: 1 << 30,
        max_record_bytes: 1 << 20,
        lease_duration: Duration::from_secs(30),
        ..ImportSettings::default()
    }
}

impl TestApp {
    pub fn importer(&self, settings: ImportSettings) -> Importer {
        Importer::new(self.pool.clone(), Some(self.s3.clone()), settings)
    }

    pub async fn put(&self, key: &str, body: Vec<u8>) {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .expect("put object");
    }

    pub fn location(&self, key: &str) -> SourceLocation {
        SourceLocation::S3 {
            bucket: self.bucket.clone(),
            key: key.to_owned(),
        }
    }

    /// Creates a pending run importing `key` of this test's bucket into `dataset`;
    /// returns the run and dataset ids.
    pub async fn create_run(
        &self,
        importer: &Importer,
        dataset: &str,
        key: &str,
        skip_bad_rows: bool,
    ) -> (Uuid, i64) {
        let parameters = ImportParameters {
            source: self.location(key),
            expected_etag: None,
            options: dsa_ingest::import::run::ImportOptions {
                skip_bad_rows,
                ..Default::default()
            },
        };
        importer
            .create_run(
                &DatasetName::parse(dataset).unwrap(),
                Some("tester"),
                &parameters,
            )
            .await
            .expect("create run")
    }

    /// Creates a run for `key` in `dataset` and imports it with `settings`.
    pub async fn import_with(
        &self,
        settings: ImportSettings,
        dataset: &str,
        key: &str,
        skip_bad_rows: bool,
    ) -> (Uuid, Result<ImportSummary, ImportError>) {
        let importer = self.importer(settings);
        let (run_id, _) = self
            .create_run(&importer, dataset, key, skip_bad_rows)
            .await;
        (run_id, importer.run(run_id).await)
    }

    pub async fn import(&self, dataset: &str, key: &str) -> ImportSummary {
        let (_, result) = self.import_with(test_settings(), dataset, key, false).await;
        result.expect("import succeeds")
    }

    /// Imports `key` expecting a failure; checks that the run is `failed` with the
    /// same message a person would read, and returns that message.
    pub async fn import_fails(&self, dataset: &str, key: &str) -> String {
        let (run_id, result) = self.import_with(test_settings(), dataset, key, false).await;
        let message = match result {
            Ok(summary) => panic!("the import of {key} succeeded: {summary:?}"),
            Err(error) => error.to_string(),
        };
        let (status, stored, _) = self.run_state(run_id).await;
        assert_eq!(
            (status.as_str(), stored.as_deref()),
            ("failed", Some(message.as_str())),
            "the run of {key}"
        );
        message
    }

    /// The one way tests start `dsa-ingest`: a child process pointed at this test's
    /// services, logging warnings, with no standard input. Callers add arguments and
    /// settings (a later `env` of the same name wins).
    pub fn child(&self) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dsa-ingest"));
        command
            .envs(self.child_env())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        command
    }

    /// [`TestApp::child`] with small batches and ranges, so that even small files
    /// cross many of each.
    pub fn cli(&self) -> std::process::Command {
        let mut command = self.child();
        command
            .env("IMPORT_BATCH_SIZE", "200")
            .env("IMPORT_CHUNK_SIZE", "65536");
        command
    }

    /// Runs `dsa-ingest ARGS` (as [`TestApp::cli`]) to success and returns its stdout;
    /// a failure fails the test with the command's stderr.
    pub fn cli_ok(&self, args: &[&str]) -> Vec<u8> {
        let output = self.cli().args(args).output().expect("dsa-ingest runs");
        assert!(
            output.status.success(),
            "dsa-ingest {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// [`TestApp::cli_ok`]'s stdout as text.
    pub fn cli_text(&self, args: &[&str]) -> String {
        String::from_utf8(self.cli_ok(args)).expect("UTF-8 output")
    }

    /// Environment for a child `dsa-ingest` process pointed at this test's services.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL".to_owned(), self.database_url.clone()),
            // Children serving health and metrics must not fight over one port.
            ("METRICS_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ];
        for key in [
            "S3_ENDPOINT",
            "S3_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            if let Some(value) = self.services.get(key) {
                env.push((key.to_owned(), value.clone()));
            }
        }
        env
    }

    /// `(logical_row_id, row_hash)` of every entry of `commit_id`, in no set order.
    pub async fn entries(&self, commit_id: &str) -> Vec<(String, Vec<u8>)> {
        sqlx::query_as(
            "SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $1",
        )
        .bind(commit_id)
        .fetch_all(&self.pool)
        .await
        .expect("entries")
    }

    /// Ends every client session of this test's database but the one asking (an
    /// import's connections among them); returns how many it ended.
    pub async fn cut_client_connections(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND backend_type = 'client backend') t",
        )
        .fetch_one(&self.pool)
        .await
        .expect("terminate the database's client sessions")
    }

    /// `SELECT count(*) FROM {from_where}`: how many rows a table (and condition) holds.
    pub async fn count(&self, from_where: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {from_where}"))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// The run's status, error message and whether `completed_at` is set.
    pub async fn run_state(&self, run_id: Uuid) -> (String, Option<String>, bool) {
        sqlx::query_as(
            "SELECT status::text, error_message, completed_at IS NOT NULL
               FROM dsa_jobs.analysis_runs WHERE id = $1",
        )
        .bind(run_id)
        .fetch_one(&self.pool)
        .await
        .expect("run exists")
    }

    /// The commit's rows as (logical_row_id, data) in row order.
    pub async fn commit_rows(&self, commit_id: &str) -> Vec<(String, serde_json::Value)> {
        sqlx::query_as(
            "SELECT cr.logical_row_id, r.data
               FROM dsa_core.commit_rows cr JOIN dsa_core.rows r USING (row_hash)
              WHERE cr.commit_id = $1
              ORDER BY split_part(cr.logical_row_id, ':', 1),
                       split_part(cr.logical_row_id, ':', 2)::bigint",
        )
        .bind(commit_id)
        .fetch_all(&self.pool)
        .await
        .expect("commit rows")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let database_name = self.database_name.clone();
        let s3_settings = s3_settings(&self.services);
        let bucket = self.bucket.clone();
        // Drop cannot await, so clean up on a thread with a runtime of its own. The pool
        // is not closed from there (its connections belong to the test's runtime, which
        // is blocked here); FORCE ends them instead.
        run_on_own_thread(async move {
            if let Ok(admin) = PgPool::connect(&admin_url).await {
                let _ = sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS {database_name} WITH (FORCE)"
                ))
                .execute(&admin)
                .await;
            }
            // A client of this runtime's own: the test's client has its connection
            // tasks on the blocked runtime.
            let s3 = dsa_ingest::s3::client(&s3_settings).await;
            if let Ok(listing) = s3.list_objects_v2().bucket(&bucket).send().await {
                for object in listing.contents() {
                    if let Some(key) = object.key() {
                        let _ = s3.delete_object().bucket(&bucket).key(key).send().await;
                    }
                }
            }
            let _ = s3.delete_bucket().bucket(&bucket).send().await;
        });
    }
}

/// Runs `cleanup` to its end on a new thread with a runtime of its own: `Drop` cannot
/// await, and the test's runtime is blocked while it drops. Runs after a failed
/// assertion too, so tests leave nothing behind.
pub fn run_on_own_thread(cleanup: impl Future<Output = ()> + Send + 'static) {
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cleanup runtime")
            .block_on(cleanup);
    });
    let _ = thread.join();
}

/// Polls `condition` until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
