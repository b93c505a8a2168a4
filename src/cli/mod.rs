//! The command line: parses arguments, wires settings to the import core, prints results.

mod options;
mod output;
pub mod submit;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::config::Settings;
use crate::db::{self, DatasetName};
use crate::import::run::{ImportParameters, SourceLocation};
use crate::import::{retry_backoff, ImportSummary, Importer, Outcome};
use backoff::backoff::Backoff;
use options::RunOptions;
use output::{print_status, print_summary};

#[derive(Debug, Parser)]
#[command(
    name = "dsa-ingest",
    version,
    about = "Imports CSV and spreadsheet files into versioned datasets in PostgreSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the database schema (safe to run again).
    Migrate,
    /// Manage datasets.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Import one CSV or spreadsheet file in this process, from a local path or s3://bucket/key.
    Import(ImportArgs),
    /// Consume import messages from the broker until SIGTERM or Ctrl-C
    /// (IMPORT_PARALLEL_WORKERS imports at once).
    Consume,
    /// Queue an import for the consumers: upload a local file to S3_BUCKET (or name an
    /// s3://bucket/key), create the run, publish its message; --wait follows it.
    Submit(submit::SubmitArgs),
    /// Refresh the search index on request from the maintenance queue, coalescing bursts
    /// (MAINTENANCE_COALESCE_MS), and relay the outbox, until SIGTERM or Ctrl-C.
    Maintain,
    /// Turn objects dropped under a bucket prefix into queued runs, by listing (any S3
    /// store), until SIGTERM or Ctrl-C: one rule from the arguments, or the rules of
    /// WATCH_RULES_FILE.
    Watch(WatchArgs),
    /// Serve the HTTP API on HTTP_ADDR (uploads that become queued runs, runs and their
    /// events) with /healthz, /readyz and /metrics, until SIGTERM or Ctrl-C.
    Serve {
        /// Serve without API_TOKENS_FILE: every caller may read and import into every
        /// dataset. Only for a trusted network or local development.
        #[arg(long)]
        insecure_no_auth: bool,
    },
    /// The dataset history: log, diff, export, verify, gc.
    #[command(flatten)]
    History(crate::history::HistoryCommand),
    /// Show a run's status, progress, checkpoint and result.
    Status {
        run_id: Uuid,
        /// Print the run as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DatasetCommand {
    /// Create a dataset (does nothing if it exists).
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The dataset to import into; created if it does not exist.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    dataset: Option<String>,
    /// A local path or s3://bucket/key.
    #[arg(required_unless_present = "resume", conflicts_with = "resume")]
    source: Option<SourceLocation>,
    /// Continue a run that was interrupted, from its last checkpoint.
    #[arg(long, value_name = "RUN_ID")]
    resume: Option<Uuid>,
    #[command(flatten)]
    options: RunOptions,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// How long to go on retrying, from the run's checkpoint, while the database or the
    /// store is away (seconds; 0: not at all). After that, or on Ctrl-C, the run is
    /// left paused for --resume.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    retry_for: u64,
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// One rule: the bucket and the key prefix to watch (without it, the rules come from
    /// WATCH_RULES_FILE).
    #[arg(value_name = "s3://BUCKET/PREFIX")]
    location: Option<String>,
    /// The dataset: a name, or a name built from the key with {segment:N} (its Nth path
    /// segment, from 1). Default: as for S3 events (S3_EVENT_DATASET, else the key's
    /// first segment, else the file's base name).
    #[arg(long)]
    dataset: Option<String>,
    /// Only keys whose part below the prefix matches this glob (*.csv, **/*.xlsx).
    #[arg(long, value_name = "GLOB")]
    pattern: Option<String>,
    /// Keys only grow (dated names): list only after the last key seen.
    #[arg(long)]
    ordered: bool,
    /// What to do with an object once its run completed: keep, delete or move:PREFIX/.
    #[arg(long, value_name = "ACTION")]
    after: Option<String>,
    /// What to do with an object once its run failed: keep, delete or move:PREFIX/.
    #[arg(long, value_name = "ACTION")]
    after_failure: Option<String>,
    #[command(flatten)]
    options: RunOptions,
}

impl WatchArgs {
    /// Whether any flag of a command-line rule was given.
    fn has_rule_flags(&self) -> bool {
        self.dataset.is_some()
            || self.pattern.is_some()
            || self.ordered
            || self.after.is_some()
            || self.after_failure.is_some()
            || self.options.user.is_some()
            || self.options.import_options().ok() != Some(Default::default())
    }

    /// The rules to watch, checked: the one these arguments give, or WATCH_RULES_FILE's.
    fn rules(self, settings: &Settings) -> anyhow::Result<Vec<crate::watch::rules::Rule>> {
        use crate::watch::rules::{check_rules, load_rules_file, Rule, RuleSpec};
        match (&self.location, &settings.watch.rules_file) {
            (Some(_), Some(path)) => anyhow::bail!(
                "give one rule as s3://BUCKET/PREFIX or set WATCH_RULES_FILE ({}), not both",
                path.display()
            ),
            (None, None) => anyhow::bail!(
                "nothing to watch: give s3://BUCKET/PREFIX --dataset NAME, or set WATCH_RULES_FILE to a rules file"
            ),
            (None, Some(path)) => {
                if self.has_rule_flags() {
                    anyhow::bail!(
                        "rule options on the command line need s3://BUCKET/PREFIX; with WATCH_RULES_FILE ({}) put them in the file",
                        path.display()
                    );
                }
                Ok(load_rules_file(path, &settings.source_policy)?)
            }
            (Some(location), None) => {
                let origin = "the command line";
                let spec = RuleSpec {
                    dataset: self.dataset.clone(),
                    pattern: self.pattern.clone(),
                    ordered: self.ordered,
                    after: self.after.clone(),
                    after_failure: self.after_failure.clone(),
                    user: self.options.user.clone(),
                    ..RuleSpec::from_location(location)
                        .map_err(|message| anyhow::anyhow!("{origin}: {message}"))?
                };
                let options = self
                    .options
                    .import_options()
                    .map_err(|message| anyhow::anyhow!("{origin}: {message}"))?;
                let rules = vec![Rule::build(spec, options, origin)?];
                check_rules(&rules, &settings.source_policy, origin)?;
                Ok(rules)
            }
        }
    }
}

/// Runs the command; errors are printed here, once, and become the exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let code = match execute(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    };
    // The process's own high-water mark (VmHWM), which a parent cannot read reliably
    // once we exit: rusage of a child spawned with vfork also counts the parent.
    tracing::debug!(
        peak_rss_bytes = crate::process::peak_rss_bytes(),
        "command finished"
    );
    code
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::from_env()?;
    // An import holds a few connections (its look-up, and its batches in flight: one
    // committing while the next ones store their rows); the consumer's own queries and
    // the relay need a few more.
    let per_import = settings.import.connections_per_import();
    let connections = match cli.command {
        Command::Consume => per_import * settings.parallel_workers as u32 + 4,
        _ => per_import + 2,
    };
    let pool = db::connect(settings.database_url.expose(), connections)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", settings.database_url))?;
    if !matches!(cli.command, Command::Migrate) {
        db::check_schema(&pool).await?;
    }
    match cli.command {
        Command::Migrate => {
            db::migrate(&pool).await.context("applying migrations")?;
            println!("database schema is up to date");
        }
        Command::Dataset(DatasetCommand::Create { name, description }) => {
            let name = DatasetName::parse(&name)?;
            let (id, created) = db::ensure_dataset(&pool, &name, description.as_deref()).await?;
            let verb = if created { "created" } else { "already exists" };
            println!("dataset {:?} {verb} (id {id})", name.as_str());
        }
        Command::Import(args) => import(settings, pool, args).await?,
        Command::Consume => consume(settings, pool).await?,
        Command::Submit(args) => return Ok(submit::command(settings, pool, args).await?),
        Command::Maintain => maintain(settings, pool).await?,
        Command::Watch(args) => watch(settings, pool, args).await?,
        Command::Serve { insecure_no_auth } => serve(settings, pool, insecure_no_auth).await?,
        Command::History(command) => {
            return Ok(crate::history::run(command, &settings, pool).await?)
        }
        Command::Status { run_id, json } => {
            let Some(run) = crate::runs::run_status(&pool, run_id).await? else {
                anyhow::bail!("run {run_id} does not exist");
            };
            if json {
                println!("{}", serde_json::to_string(&run)?);
            } else {
                print_status(&run);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn import(settings: Settings, pool: sqlx::PgPool, args: ImportArgs) -> anyhow::Result<()> {
    // A resumed run's source is only known once it is claimed, so it may need S3.
    let needs_s3 = matches!(
        (&args.source, args.resume),
        (Some(SourceLocation::S3 { .. }), _) | (None, Some(_))
    );
    let s3 = if needs_s3 {
        Some(crate::s3::client(&settings.s3).await)
    } else {
        None
    };
    // A transient failure releases the run instead of failing it, so that it stays
    // resumable; `import_with_retries` retries it or says how to go on.
    let importer =
        Importer::new(pool, s3, settings.import.clone()).keep_runs_on_transient_failure();
    let run_id = match (args.resume, args.source, args.dataset) {
        (Some(run_id), _, _) => run_id,
        (None, Some(source), Some(dataset)) => {
            let dataset = DatasetName::parse(&dataset)?;
            let parameters = ImportParameters {
                source,
                expected_etag: None,
                options: args.options.import_options().map_err(anyhow::Error::msg)?,
            };
            let (run_id, _) = importer
                .create_run(&dataset, args.options.user.as_deref(), &parameters)
                .await?;
            run_id
        }
        _ => anyhow::bail!("give --dataset NAME and SOURCE, or --resume RUN_ID"),
    };
    // Ctrl-C or SIGTERM stops the import after the batch it is committing, or at once
    // before the first batch (the run stays resumable); a second one quits at once.
    let importer = importer.stop_on(stop_on_signals(run_id)?);
    let summary =
        import_with_retries(&importer, run_id, Duration::from_secs(args.retry_for)).await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

/// A token cancelled by the first SIGINT (Ctrl-C) or SIGTERM; the second of either
/// quits at once. Both are listened for from the start, so no signal falls between.
/// Either way the run resumes from its last checkpoint, and a run left with the live
/// lease of a dead process on this host is claimed at once.
#[cfg(unix)]
fn stop_on_signals(run_id: Uuid) -> anyhow::Result<crate::shutdown::CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let stop = crate::shutdown::CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        for signals in 1.. {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            if signals == 1 {
                eprintln!("stopping (after the batch being committed, if any); Ctrl-C again quits at once");
                cancel.cancel();
            } else {
                eprintln!("quit; continue the run with `dsa-ingest import --resume {run_id}`");
                std::process::exit(130);
            }
        }
    });
    Ok(stop)
}

/// Elsewhere the first Ctrl-C stops the import as on unix; a second one is left to the
/// default handling.
#[cfg(not(unix))]
fn stop_on_signals(_run_id: Uuid) -> anyhow::Result<crate::shutdown::CancellationToken> {
    Ok(crate::shutdown::on_signals())
}

/// Imports `run_id`, retrying a transient failure (the database or the store away, a
/// batch lost in a database crash) from the run's checkpoint with backoff for up to
/// `budget`, as a consumer does. A run that still cannot go on, or that a signal
/// stopped, is left paused, and the error says how to resume it.
async fn import_with_retries(
    importer: &Importer,
    run_id: Uuid,
    budget: Duration,
) -> anyhow::Result<ImportSummary> {
    let mut retries = None;
    // The batches committed when the last failure came: an attempt that got further
    // starts the budget again, which is for one outage, not for a whole long import.
    let mut batches_at_failure = None;
    let paused = |why: String| {
        anyhow::anyhow!(
            "import run {run_id}: {why}; the run is paused at its last checkpoint, \
             continue it with `dsa-ingest import --resume {run_id}`"
        )
    };
    loop {
        if importer.is_stopping() {
            return Err(paused("stopped by a signal".to_owned()));
        }
        let error = match importer.run(run_id).await {
            Ok(summary) => return Ok(summary),
            Err(error) => error,
        };
        match error.outcome() {
            Outcome::Transient => {
                if let Ok(batches) = crate::runs::committed_batches(importer.pool(), run_id).await {
                    if batches_at_failure.is_some_and(|before| batches > before) {
                        retries = None;
                    }
                    batches_at_failure = Some(batches);
                }
                let Some(wait) = retries
                    .get_or_insert_with(|| retry_backoff(budget))
                    .next_backoff()
                else {
                    return Err(paused(format!(
                        "gave up after retrying for {} s: {error}",
                        budget.as_secs()
                    )));
                };
                tracing::warn!(run.id = %run_id, error = %error, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying from the last checkpoint");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = importer.stopped() => {
                        return Err(paused(format!("stopped while waiting to retry after: {error}")));
                    }
                }
            }
            Outcome::Interrupted => return Err(paused("stopped by a signal".to_owned())),
            _ => return Err(anyhow::Error::new(error).context(format!("import run {run_id}"))),
        }
    }
}

async fn consume(settings: Settings, pool: sqlx::PgPool) -> anyhow::Result<()> {
    let s3 = crate::s3::client(&settings.s3).await;
    if settings.source_policy.allows_any_bucket() {
        tracing::warn!(
            "IMPORT_ALLOWED_BUCKETS is unset: messages may import any object these credentials can read"
        );
    }
    let stop = crate::shutdown::on_signals();
    crate::metrics::metrics().watch_spool_dir(&settings.import.spool_dir);
    let sidecars = Sidecars::start(&settings, &pool, &stop, false).await?;
    let setup = crate::queue::consume::ConsumerSetup {
        importer: Importer::new(pool.clone(), Some(s3.clone()), settings.import.clone()),
        pool,
        s3: Some(s3),
        amqp: settings.amqp.clone(),
        workers: settings.parallel_workers,
        event_dataset: settings.s3_event_dataset.clone(),
        event_dataset_from_metadata: settings.s3_event_dataset_from_metadata,
        policy: settings.source_policy.clone(),
        health: sidecars.health.clone(),
        committed: Some(sidecars.nudge.clone()),
    };
    crate::queue::consume::run(setup, stop.clone()).await?;
    sidecars.stop(&stop).await;
    Ok(())
}

async fn maintain(settings: Settings, pool: sqlx::PgPool) -> anyhow::Result<()> {
    let stop = crate::shutdown::on_signals();
    crate::metrics::metrics().before_scrape(crate::queue::backlog::probe(
        pool.clone(),
        settings.amqp.clone(),
    ));
    let sidecars = Sidecars::start(&settings, &pool, &stop, false).await?;
    let sweeper = tokio::spawn(crate::queue::sweeper::run_sweeper(
        pool.clone(),
        settings.amqp.clone(),
        settings.maintenance.clone(),
        stop.clone(),
    ));
    crate::queue::maintain::run(
        pool,
        settings.amqp,
        settings.maintenance,
        Some(sidecars.health.clone()),
        stop.clone(),
    )
    .await;
    stop.cancel();
    if let Err(error) = sweeper.await {
        tracing::error!(error = %error, "the sweeper failed");
    }
    sidecars.stop(&stop).await;
    Ok(())
}

async fn watch(settings: Settings, pool: sqlx::PgPool, args: WatchArgs) -> anyhow::Result<()> {
    // Rules first: a mistake in them stops the process before anything is listed.
    let rules = args.rules(&settings)?;
    for rule in &rules {
        tracing::info!(
            rule = %rule.name,
            bucket = %rule.bucket,
            prefix = %rule.prefix,
            pattern = rule.pattern.as_ref().map(|p| p.as_str()).unwrap_or("**"),
            ordered = rule.ordered,
            after = %rule.after,
            after_failure = %rule.after_failure,
            "watch rule"
        );
    }
    let s3 = crate::s3::client(&settings.s3).await;
    let stop = crate::shutdown::on_signals();
    let sidecars = Sidecars::start(&settings, &pool, &stop, true).await?;
    crate::watch::declare_import_topology(&settings.amqp, &stop)
        .await
        .context("declaring the import queue")?;
    let setup = crate::watch::WatchSetup {
        pool,
        database_url: settings.database_url.clone(),
        s3,
        rules,
        settings: settings.watch.clone(),
        event_dataset: settings.s3_event_dataset.clone(),
        event_dataset_from_metadata: settings.s3_event_dataset_from_metadata,
        policy: settings.source_policy.clone(),
        nudge: sidecars.nudge.clone(),
    };
    crate::watch::run(setup, stop.clone()).await;
    sidecars.stop(&stop).await;
    Ok(())
}

async fn serve(
    settings: Settings,
    pool: sqlx::PgPool,
    insecure_no_auth: bool,
) -> anyhow::Result<()> {
    use crate::serve::{Clients, ServeSetup};
    let clients = match (&settings.http.tokens_file, insecure_no_auth) {
        (Some(_), true) => anyhow::bail!("give API_TOKENS_FILE or --insecure-no-auth, not both"),
        (Some(path), false) => Clients::load(path).map_err(anyhow::Error::msg)?,
        (None, true) => {
            tracing::warn!(
                "--insecure-no-auth: every caller may read and import into every dataset"
            );
            Clients::insecure_anyone()
        }
        (None, false) => anyhow::bail!(
            "API_TOKENS_FILE is not set: give it a tokens file (see the README), or pass \
             --insecure-no-auth to serve without authentication"
        ),
    };
    let bucket = settings.s3.bucket.clone().ok_or_else(|| {
        anyhow::anyhow!("S3_BUCKET is not set: serve stores uploads in that bucket")
    })?;
    let s3 = crate::s3::client(&settings.s3).await;
    let probe = db::probe_pool(settings.database_url.expose())?;
    let health = crate::http::Health::with_probe(pool.clone(), probe);
    let listener = tokio::net::TcpListener::bind(&settings.http.addr)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP_ADDR)", settings.http.addr))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        "serving /healthz, /readyz, /metrics and the API under /v1"
    );
    let stop = crate::shutdown::on_signals();
    let setup = ServeSetup {
        pool,
        s3,
        bucket,
        settings,
        clients,
        health,
    };
    crate::serve::run(setup, listener, stop).await?;
    Ok(())
}

/// What runs beside the work of `consume`, `maintain` and `watch`: the health and
/// metrics server, and an outbox relay that publishes each commit's search-refresh
/// request and the run references `watch` queues (nudged after every import `consume`
/// completes and every page `watch` queues, and sweeping every few seconds for what
/// `import` runs and dead processes left behind).
struct Sidecars {
    health: crate::http::Health,
    nudge: tokio::sync::mpsc::Sender<()>,
    server: crate::http::ServerHandle,
    relay: tokio::task::JoinHandle<()>,
}

impl Sidecars {
    async fn start(
        settings: &Settings,
        pool: &sqlx::PgPool,
        stop: &crate::shutdown::CancellationToken,
        relay_reports_broker: bool,
    ) -> anyhow::Result<Self> {
        let probe = db::probe_pool(settings.database_url.expose())?;
        let health = crate::http::Health::with_probe(pool.clone(), probe);
        let server = crate::http::spawn_server(
            &settings.metrics_addr,
            health.clone(),
            stop.clone().cancelled_owned(),
        )
        .await?;
        let (nudge, nudges) = tokio::sync::mpsc::channel(1);
        let relay = tokio::spawn(crate::queue::relay::run_relay(
            pool.clone(),
            settings.amqp.clone(),
            nudges,
            relay_reports_broker.then(|| health.clone()),
            stop.clone(),
        ));
        Ok(Self {
            health,
            nudge,
            server,
            relay,
        })
    }

    /// Stops both once the consumer has returned. Requests of imports that finished
    /// during the grace period go out at the next sweep of any relay.
    async fn stop(self, stop: &crate::shutdown::CancellationToken) {
        stop.cancel();
        if let Err(error) = self.relay.await {
            tracing::error!(error = %error, "the outbox relay failed");
        }
        let _ = self.server.task.await;
    }
}
