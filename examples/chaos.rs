//! The chaos run: a mixed set of files (CSV and xlsx, some with bad rows imported with
//! `--skip-bad-rows`, some submitted twice) goes to three `dsa-ingest consume`
//! processes and one `dsa-ingest maintain` on private services (PostgreSQL, RabbitMQ
//! and Garage of its own), while faults picked at random from a printed seed hit them:
//! `kill -9` of a consumer, SIGSTOP past the lease, a broker restart, the consumers'
//! database connections terminated, a database restart, an S3 outage.
//!
//! At the end it checks, from the files and the database alone, that every run
//! completed once with exactly its file's rows, that nothing unfinished or orphaned is
//! left, that no message was dead-lettered and that the search view lists every
//! dataset; prints a table of what it did and found; and exits non-zero when anything
//! was lost, duplicated or could not be checked. Run it with `scripts/chaos`.
//!
//! `cargo run --example chaos -- --state-dir DIR [--files 40] [--faults 30] [--seed N]`

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[path = "chaos/files.rs"]
mod files;
#[path = "chaos/services.rs"]
mod services;
#[path = "support/mod.rs"]
mod support;

use files::{ChaosFile, FileSizes, Random};
use services::Services;

/// The chaos run's options.
#[derive(clap::Parser)]
struct Args {
    /// Files to import (each in a dataset of its own; some are submitted twice).
    #[arg(long, default_value_t = 40)]
    files: usize,
    /// Faults to inject (each of the six kinds at least once when there are six or more).
    #[arg(long, default_value_t = 30)]
    faults: usize,
    /// The seed of the files and faults; a run is replayed by giving its seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Fewest data rows of a file.
    #[arg(long, value_parser = support::parse_count, default_value = "5000")]
    min_rows: u64,
    /// Most data rows of a file.
    #[arg(long, value_parser = support::parse_count, default_value = "40000")]
    max_rows: u64,
    /// IMPORT_LEASE_SECONDS of the consumers; a paused consumer stays paused longer.
    #[arg(long, default_value_t = 4)]
    lease_seconds: u64,
    /// Where the services, files and logs of the run live (made by `scripts/chaos`).
    #[arg(long)]
    state_dir: PathBuf,
    /// The Garage binary (`scripts/services` installs it).
    #[arg(long, env = "GARAGE")]
    garage: PathBuf,
}

/// The dead-letter and import queues, as the consumers name them by default.
const DEAD_LETTER_QUEUE: &str = "dsa.imports.dead";
const IMPORT_QUEUE: &str = "dsa.imports";
const CONSUMERS: usize = 3;

#[tokio::main]
async fn main() -> ExitCode {
    match run(clap::Parser::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("chaos: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The whole run; `Ok(false)` when the checks found something wrong.
async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(args.files > 0, "--files must be at least 1");
    anyhow::ensure!(
        args.min_rows > 0 && args.min_rows <= args.max_rows,
        "--min-rows must be at least 1 and at most --max-rows"
    );
    let seed = match args.seed {
        Some(seed) => seed,
        None => random_seed()?,
    };
    println!("chaos: seed {seed} (replay with --seed {seed})");
    let mut random = Random::new(seed);
    let started = Instant::now();
    let binary = support::sibling_binary("dsa-ingest")?;

    let files = files::generate(
        &args.state_dir.join("files"),
        &FileSizes {
            files: args.files,
            min_rows: args.min_rows,
            max_rows: args.max_rows,
        },
        &mut random,
    )?;
    progress(started, format_args!("wrote {} files", files.len()));

    let mut services =
        tokio::task::block_in_place(|| Services::start(&args.state_dir, args.garage.clone()))?;
    progress(
        started,
        format_args!(
            "private services up: PostgreSQL :{}, RabbitMQ {} :{}, Garage {}",
            services.postgres.port,
            services.rabbitmq.node,
            services.rabbitmq.port,
            services.garage.endpoint()
        ),
    );
    support::recreate_database(&services.postgres.database_url(), services::DATABASE).await?;
    let env = services.env();
    let migrated = Command::new(&binary)
        .arg("migrate")
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()?;
    if !migrated.status.success() {
        bail!(
            "dsa-ingest migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&services.postgres.database_url())
        .await?;

    let mut fleet = Fleet::start(&binary, &env, &args.state_dir, args.lease_seconds)?;
    fleet.await_consumers_ready().await?;
    progress(
        started,
        format_args!("{CONSUMERS} consumers and one maintainer running"),
    );

    let stop_monitor = CancellationToken::new();
    let monitor = Monitor::start(pool.clone(), stop_monitor.clone());

    let mut submissions: Vec<usize> = (0..files.len())
        .chain((0..files.len()).filter(|&index| files[index].duplicate))
        .collect();
    random.shuffle(&mut submissions);
    let plan = fault_plan(args.faults, &mut random);
    let mut submitted = Vec::new();
    let mut waiting = submissions.iter();
    let mut injected = Vec::new();
    for (number, kind) in plan.iter().enumerate() {
        // Files go in spread over the faults (and sooner when the consumers ran out
        // of work), so that every fault finds imports in flight.
        let share = submissions.len() * (number + 1) / (plan.len() + 1);
        while submitted.len() < share.max(1) || unfinished_runs(&pool).await? == 0 {
            let Some(&index) = waiting.next() else { break };
            submitted.push(submit(&binary, &env, &files, index).await?);
        }
        await_an_import_in_flight(&pool).await?;
        let fault = {
            let mut context = FaultContext {
                services: &mut services,
                fleet: &mut fleet,
                pool: &pool,
                random: &mut random,
                lease_seconds: args.lease_seconds,
            };
            context.inject(*kind).await?
        };
        progress(
            started,
            format_args!("fault {}/{}: {}", number + 1, plan.len(), fault.detail),
        );
        injected.push(fault);
        tokio::time::sleep(Duration::from_millis(random.between(500, 2_000))).await;
    }
    for &index in waiting {
        submitted.push(submit(&binary, &env, &files, index).await?);
    }
    progress(
        started,
        format_args!(
            "{} runs submitted; waiting for them to finish",
            submitted.len()
        ),
    );

    let deadline = Duration::from_secs(120 + 5 * submitted.len() as u64);
    let finished = await_runs_finished(&pool, submitted.len(), deadline).await;
    match &finished {
        Ok(()) => progress(started, format_args!("all runs finished; checking")),
        Err(error) => progress(started, format_args!("{error:#}; checking what there is")),
    }
    let report = check(&pool, &services, &files, &submitted).await?;
    stop_monitor.cancel();
    let observations = monitor.await?;
    progress(
        started,
        format_args!("checked; stopping the consumers and the maintainer"),
    );
    fleet.stop();
    let effects = effects_of_faults(&injected, &observations);
    for (number, (fault, effect)) in injected.iter().zip(&effects).enumerate() {
        let slowest = match effect.runs_in_flight {
            0 => String::new(),
            _ => format!(
                ", the slowest moved again after {:.1} s",
                effect.longest_wait.as_secs_f64()
            ),
        };
        eprintln!(
            "fault {:>2}: {:<24} {} runs in flight{slowest}",
            number + 1,
            fault.kind.label(),
            effect.runs_in_flight,
        );
    }

    print_table(
        seed, &args, &files, &submitted, &injected, &effects, &report,
    );
    progress(started, format_args!("done"));
    Ok(report.passed() && finished.is_ok())
}

/// A seed from the kernel's random source.
fn random_seed() -> anyhow::Result<u64> {
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes)?;
    // Seeds people can type: below ten billion.
    Ok(u64::from_le_bytes(bytes) % 10_000_000_000)
}

fn progress(started: Instant, message: fmt::Arguments) {
    eprintln!("[{:>7.1}s] {message}", started.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------ the processes

/// Starts `dsa-ingest` children on the private services: logs appended to
/// `logs/NAME.log`, pids in `pids/NAME.pid` (for the wrapper script's clean-up).
struct Launcher {
    binary: PathBuf,
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
}

impl Launcher {
    fn spawn(&self, subcommand: &str, name: &str) -> anyhow::Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("logs/{name}.log")))?;
        let child = Command::new(&self.binary)
            .arg(subcommand)
            .envs(self.env.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting dsa-ingest {subcommand}"))?;
        fs::write(
            self.dir.join(format!("pids/{name}.pid")),
            child.id().to_string(),
        )?;
        Ok(child)
    }
}

/// The `dsa-ingest` children: three consumers and one maintainer.
struct Fleet {
    launcher: Launcher,
    consumers: Vec<Child>,
    maintainer: Child,
}

impl Fleet {
    fn start(
        binary: &Path,
        services_env: &[(&'static str, String)],
        state_dir: &Path,
        lease_seconds: u64,
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(state_dir.join("logs"))?;
        fs::create_dir_all(state_dir.join("pids"))?;
        let mut env = services_env.to_vec();
        env.extend([
            ("IMPORT_LEASE_SECONDS", lease_seconds.to_string()),
            ("IMPORT_PARALLEL_WORKERS", "2".to_owned()),
            // Small batches: many checkpoints for a fault to fall between.
            ("IMPORT_BATCH_SIZE", "500".to_owned()),
            // AMQP_RETRY_SECONDS keeps its default (300 s), which outlasts every outage
            // the run injects: a shorter one dead-letters messages by design.
            ("SHUTDOWN_GRACE_SECONDS", "10".to_owned()),
            ("SWEEPER_INTERVAL_SECONDS", "2".to_owned()),
            ("SWEEPER_GRACE_SECONDS", "2".to_owned()),
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]);
        let launcher = Launcher {
            binary: binary.to_owned(),
            env,
            dir: state_dir.to_owned(),
        };
        let maintainer = launcher.spawn("maintain", "maintainer")?;
        let consumers = (1..=CONSUMERS)
            .map(|number| launcher.spawn("consume", &format!("consumer{number}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            launcher,
            consumers,
            maintainer,
        })
    }

    fn consumer_log(&self, index: usize) -> String {
        fs::read_to_string(
            self.launcher
                .dir
                .join(format!("logs/consumer{}.log", index + 1)),
        )
        .unwrap_or_default()
    }

    /// Waits until each consumer has subscribed (as often as it was started).
    async fn await_consumers_ready(&self) -> anyhow::Result<()> {
        for index in 0..self.consumers.len() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self
                .consumer_log(index)
                .contains("consuming import messages")
            {
                if Instant::now() > deadline {
                    bail!(
                        "consumer {} did not subscribe within 60 s; its log ends: {}",
                        index + 1,
                        tail(&self.consumer_log(index))
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    fn consumer_pids(&self) -> Vec<String> {
        self.consumers
            .iter()
            .map(|child| child.id().to_string())
            .collect()
    }

    /// `kill -9` of consumer `index`; returns its pid.
    fn kill_consumer(&mut self, index: usize) -> anyhow::Result<u32> {
        let consumer = &mut self.consumers[index];
        let pid = consumer.id();
        consumer.kill()?;
        consumer.wait()?;
        Ok(pid)
    }

    fn restart_consumer(&mut self, index: usize) -> anyhow::Result<u32> {
        self.consumers[index] = self
            .launcher
            .spawn("consume", &format!("consumer{}", index + 1))?;
        Ok(self.consumers[index].id())
    }

    fn signal_consumer(&self, index: usize, signal: libc::c_int) -> anyhow::Result<()> {
        // SAFETY: kill(2) with the pid of a child this process has not yet reaped.
        if unsafe { libc::kill(self.consumers[index].id() as libc::pid_t, signal) } != 0 {
            bail!(
                "signal {signal} to consumer {}: {}",
                index + 1,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGTERM to every child, then waits for each (a kill after the grace period).
    fn stop(&mut self) {
        let children = self.consumers.iter_mut().chain([&mut self.maintainer]);
        for child in children {
            // SAFETY: as in `signal_consumer`.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// `dsa-ingest submit` of file `index`; the run it created.
async fn submit(
    binary: &Path,
    env: &[(&'static str, String)],
    files: &[ChaosFile],
    index: usize,
) -> anyhow::Result<Submitted> {
    let file = &files[index];
    let mut command = tokio::process::Command::new(binary);
    command
        .args(["submit", "--json", "--dataset", &file.dataset()])
        .arg(&file.path)
        .envs(env.iter().map(|(k, v)| (*k, v)));
    if file.skip_bad_rows {
        command.arg("--skip-bad-rows");
    }
    let output = command.output().await?;
    if !output.status.success() {
        bail!(
            "dsa-ingest submit {} failed: {}",
            file.path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "submit printed {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    let run_id = answer["run_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .context("submit printed no run_id")?;
    Ok(Submitted {
        file: index,
        run_id,
    })
}

/// A run created by `submit`, and the file it imports.
struct Submitted {
    file: usize,
    run_id: Uuid,
}

// ------------------------------------------------------------------------------ faults

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    KillConsumer,
    PauseConsumer,
    RestartBroker,
    TerminateConnections,
    RestartDatabase,
    S3Outage,
}

impl FaultKind {
    const ALL: [FaultKind; 6] = [
        FaultKind::KillConsumer,
        FaultKind::PauseConsumer,
        FaultKind::RestartBroker,
        FaultKind::TerminateConnections,
        FaultKind::RestartDatabase,
        FaultKind::S3Outage,
    ];

    fn label(self) -> &'static str {
        match self {
            FaultKind::KillConsumer => "kill -9 of a consumer",
            FaultKind::PauseConsumer => "SIGSTOP past the lease",
            FaultKind::RestartBroker => "RabbitMQ restart",
            FaultKind::TerminateConnections => "pg_terminate_backend",
            FaultKind::RestartDatabase => "PostgreSQL restart",
            FaultKind::S3Outage => "S3 outage",
        }
    }
}

/// `count` faults: each kind once (when `count` allows), the rest at random, shuffled.
fn fault_plan(count: usize, random: &mut Random) -> Vec<FaultKind> {
    let mut plan: Vec<FaultKind> = FaultKind::ALL.iter().copied().take(count).collect();
    while plan.len() < count {
        plan.push(*random.pick(&FaultKind::ALL));
    }
    random.shuffle(&mut plan);
    plan
}

/// A fault as it was injected.
struct Injected {
    kind: FaultKind,
    at: Instant,
    detail: String,
}

/// What injecting a fault reaches.
struct FaultContext<'a> {
    services: &'a mut Services,
    fleet: &'a mut Fleet,
    pool: &'a PgPool,
    random: &'a mut Random,
    lease_seconds: u64,
}

impl FaultContext<'_> {
    /// A consumer picked at random among those holding a running import (its pid ends
    /// the lease owner, the worker identity), or among all when none does.
    async fn consumer_mid_import(&mut self) -> usize {
        let owners: Vec<String> = sqlx::query_scalar(
            "SELECT lease_owner FROM dsa_jobs.analysis_runs
              WHERE status = 'running' AND lease_owner IS NOT NULL",
        )
        .fetch_all(self.pool)
        .await
        .unwrap_or_default();
        let pids = self.fleet.consumer_pids();
        let holding: Vec<usize> = (0..pids.len())
            .filter(|&index| {
                owners
                    .iter()
                    .any(|owner| owner.rsplit(':').next() == Some(pids[index].as_str()))
            })
            .collect();
        if holding.is_empty() {
            self.random.between(0, pids.len() as u64 - 1) as usize
        } else {
            *self.random.pick(&holding)
        }
    }

    /// Injects one fault and undoes it (restart, resume) before returning.
    async fn inject(&mut self, kind: FaultKind) -> anyhow::Result<Injected> {
        let at = Instant::now();
        let detail = match kind {
            FaultKind::KillConsumer => {
                let index = self.consumer_mid_import().await;
                let pid = self.fleet.kill_consumer(index)?;
                let down = self.random.between(500, 2_000);
                tokio::time::sleep(Duration::from_millis(down)).await;
                let new_pid = self.fleet.restart_consumer(index)?;
                format!(
                    "kill -9 of consumer {} (pid {pid}), restarted after {down} ms as pid {new_pid}",
                    index + 1
                )
            }
            FaultKind::PauseConsumer => {
                let index = self.consumer_mid_import().await;
                let paused = Duration::from_millis(
                    self.lease_seconds * 1_000 + self.random.between(1_500, 4_000),
                );
                self.fleet.signal_consumer(index, libc::SIGSTOP)?;
                tokio::time::sleep(paused).await;
                self.fleet.signal_consumer(index, libc::SIGCONT)?;
                format!(
                    "SIGSTOP of consumer {} for {:.1} s (lease {} s), then SIGCONT",
                    index + 1,
                    paused.as_secs_f64(),
                    self.lease_seconds
                )
            }
            FaultKind::RestartBroker => {
                let down = self.random.between(1_000, 4_000);
                let rabbitmq = &self.services.rabbitmq;
                tokio::task::block_in_place(|| -> anyhow::Result<()> {
                    rabbitmq.stop()?;
                    std::thread::sleep(Duration::from_millis(down));
                    rabbitmq.start()
                })?;
                format!(
                    "RabbitMQ stopped, started again after {down} ms (up after {:.1} s)",
                    at.elapsed().as_secs_f64()
                )
            }
            FaultKind::TerminateConnections => {
                let pids = self.fleet.consumer_pids();
                let terminated: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (
                        SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE backend_type = 'client backend'
                           AND substring(application_name from ':([0-9]+)$') = ANY($1)) t",
                )
                .bind(&pids)
                .fetch_one(self.pool)
                .await
                .context("terminating the consumers' connections")?;
                format!("pg_terminate_backend of the consumers' {terminated} connections")
            }
            FaultKind::RestartDatabase => {
                let down = self.random.between(500, 3_000);
                let postgres = &self.services.postgres;
                tokio::task::block_in_place(|| -> anyhow::Result<()> {
                    postgres.crash()?;
                    std::thread::sleep(Duration::from_millis(down));
                    postgres.start()
                })?;
                format!("PostgreSQL stopped (-m immediate), started again after {down} ms")
            }
            FaultKind::S3Outage => {
                let down = self.random.between(3_000, 8_000);
                let garage = &mut self.services.garage;
                garage.stop()?;
                tokio::time::sleep(Duration::from_millis(down)).await;
                tokio::task::block_in_place(|| garage.start())?;
                format!("Garage killed, started again after {down} ms")
            }
        };
        Ok(Injected { kind, at, detail })
    }
}

/// Import runs that are pending or running.
async fn unfinished_runs(pool: &PgPool) -> anyhow::Result<usize> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dsa_jobs.analysis_runs
          WHERE run_type = 'import' AND status IN ('pending', 'running')",
    )
    .fetch_one(pool)
    .await
    .context("counting unfinished runs")?;
    Ok(count as usize)
}

/// Waits (up to 30 s) until some run has loaded part of its file, so that the next
/// fault lands mid-import; returns at once when no run is left unfinished.
async fn await_an_import_in_flight(pool: &PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let (unfinished, in_flight): (i64, i64) = sqlx::query_as(
            "SELECT count(*),
                    count(*) FILTER (WHERE status = 'running'
                                       AND coalesce((checkpoint->>'loaded_rows')::bigint, 0) > 0)
               FROM dsa_jobs.analysis_runs
              WHERE run_type = 'import' AND status IN ('pending', 'running')",
        )
        .fetch_one(pool)
        .await
        .context("looking for imports in flight")?;
        if unfinished == 0 || in_flight > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until `expected` import runs exist and none is pending or running.
async fn await_runs_finished(
    pool: &PgPool,
    expected: usize,
    deadline: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let counts: Result<(i64, i64), _> = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status IN ('pending', 'running'))
               FROM dsa_jobs.analysis_runs WHERE run_type = 'import'",
        )
        .fetch_one(pool)
        .await;
        if let Ok((runs, unfinished)) = counts {
            if runs as usize >= expected && unfinished == 0 {
                return Ok(());
            }
            if started.elapsed() > deadline {
                bail!(
                    "{unfinished} of {runs} runs were still pending or running after {deadline:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ----------------------------------------------------------------------- the monitor

/// A run's state as the monitor saw it change.
struct Observation {
    at: Instant,
    run_id: Uuid,
    status: String,
    loaded_rows: i64,
}

/// Reads every run's status and loaded rows five times a second and keeps each change,
/// to tell how long runs waited after each fault. Reads that fail (the database is
/// being restarted) are skipped.
struct Monitor;

impl Monitor {
    fn start(pool: PgPool, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<Observation>> {
        tokio::spawn(async move {
            let mut observations = Vec::new();
            let mut last: HashMap<Uuid, (String, i64)> = HashMap::new();
            while !stop.is_cancelled() {
                let rows: Result<Vec<(Uuid, String, i64)>, _> = sqlx::query_as(
                    "SELECT id, status::text, coalesce((checkpoint->>'loaded_rows')::bigint, 0)
                       FROM dsa_jobs.analysis_runs WHERE run_type = 'import'",
                )
                .fetch_all(&pool)
                .await;
                let at = Instant::now();
                for (run_id, status, loaded_rows) in rows.unwrap_or_default() {
                    let state = (status.clone(), loaded_rows);
                    if last.get(&run_id) != Some(&state) {
                        last.insert(run_id, state);
                        observations.push(Observation {
                            at,
                            run_id,
                            status,
                            loaded_rows,
                        });
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            observations
        })
    }
}

/// What a fault (or the faults of one kind) did to the runs in flight.
#[derive(Clone, Copy, Default)]
struct FaultEffect {
    /// Runs that were running when the fault was injected.
    runs_in_flight: usize,
    /// The longest any of them took to move again (a batch loaded, or its end),
    /// including any fault that followed before it moved.
    longest_wait: Duration,
}

impl FaultEffect {
    fn add(&mut self, other: FaultEffect) {
        self.runs_in_flight += other.runs_in_flight;
        self.longest_wait = self.longest_wait.max(other.longest_wait);
    }
}

/// For each fault, in order: the runs running when it was injected and how long the
/// slowest of them took to move again.
fn effects_of_faults(injected: &[Injected], observations: &[Observation]) -> Vec<FaultEffect> {
    injected
        .iter()
        .map(|fault| {
            let mut effect = FaultEffect::default();
            let mut state_at_fault: HashMap<Uuid, &Observation> = HashMap::new();
            for observation in observations.iter().filter(|o| o.at <= fault.at) {
                state_at_fault.insert(observation.run_id, observation);
            }
            for (run_id, state) in state_at_fault {
                if state.status != "running" {
                    continue;
                }
                effect.runs_in_flight += 1;
                let moved = observations.iter().find(|o| {
                    o.run_id == run_id
                        && o.at > fault.at
                        && (o.loaded_rows != state.loaded_rows || o.status != "running")
                });
                if let Some(moved) = moved {
                    effect.longest_wait = effect.longest_wait.max(moved.at - fault.at);
                }
            }
            effect
        })
        .collect()
}

// ----------------------------------------------------------------------------- checks

/// What the checks found, from the files and the database alone.
#[derive(Default)]
struct Report {
    runs_completed_once: usize,
    runs_failed: usize,
    runs_unfinished: usize,
    unexpected_runs: usize,
    /// Runs claimed more than once: resumed from a checkpoint after a fault.
    runs_resumed: usize,
    most_attempts: i32,
    expected_rows: u64,
    committed_rows: u64,
    rows_lost: u64,
    rows_duplicated: u64,
    rows_changed: u64,
    tree_hashes_matching: usize,
    expected_rejects: u64,
    recorded_rejects: u64,
    unfinished_commits: i64,
    orphan_commit_rows: i64,
    dead_letters: Option<u64>,
    messages_left: Option<u64>,
    datasets_listed: usize,
    datasets: usize,
    /// Every problem, in words, for the end of the table.
    problems: Vec<String>,
}

impl Report {
    fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

async fn check(
    pool: &PgPool,
    services: &Services,
    files: &[ChaosFile],
    submitted: &[Submitted],
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let runs: Vec<(Uuid, String, Option<String>, i32)> = sqlx::query_as(
        "SELECT id, status::text, error_message, attempts FROM dsa_jobs.analysis_runs
          WHERE run_type = 'import'",
    )
    .fetch_all(pool)
    .await?;
    report.runs_resumed = runs.iter().filter(|run| run.3 > 1).count();
    report.most_attempts = runs.iter().map(|run| run.3).max().unwrap_or(0);
    let runs: HashMap<Uuid, (String, Option<String>)> = runs
        .into_iter()
        .map(|(id, status, error, _)| (id, (status, error)))
        .collect();
    report.unexpected_runs = runs
        .keys()
        .filter(|id| !submitted.iter().any(|s| s.run_id == **id))
        .count();
    if report.unexpected_runs > 0 {
        report.problems.push(format!(
            "{} import runs exist that no submit created",
            report.unexpected_runs
        ));
    }

    for submission in submitted {
        let file = &files[submission.file];
        check_run(
            pool,
            file,
            submission.run_id,
            runs.get(&submission.run_id),
            &mut report,
        )
        .await?;
    }

    report.unfinished_commits =
        sqlx::query_scalar("SELECT count(*) FROM dsa_core.commits WHERE committed_at IS NULL")
            .fetch_one(pool)
            .await?;
    report.orphan_commit_rows = sqlx::query_scalar(
        "SELECT count(*) FROM dsa_core.commit_rows r
          WHERE NOT EXISTS (SELECT 1 FROM dsa_core.commits c
                             WHERE c.commit_id = r.commit_id AND c.committed_at IS NOT NULL)",
    )
    .fetch_one(pool)
    .await?;
    if report.unfinished_commits != 0 || report.orphan_commit_rows != 0 {
        report.problems.push(format!(
            "{} unfinished commits and {} commit_rows outside finalised commits remain",
            report.unfinished_commits, report.orphan_commit_rows
        ));
    }

    check_queues(services, &mut report).await;
    check_search_view(pool, files, &mut report).await?;
    Ok(report)
}

/// One run: completed, exactly one finalised commit, and that commit's rows are the
/// file's rows: the same logical ids with the same row hashes, and a tree hash
/// recomputed from commit_rows that equals both the file's and the recorded one.
async fn check_run(
    pool: &PgPool,
    file: &ChaosFile,
    run_id: Uuid,
    run: Option<&(String, Option<String>)>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let expected = &file.expected;
    let expected_rows = expected.rows.len() as u64;
    report.expected_rows += expected_rows;
    let name = format!(
        "run {run_id} ({})",
        file.path.file_name().unwrap_or_default().to_string_lossy()
    );
    let Some((status, error)) = run else {
        report.runs_unfinished += 1;
        report.rows_lost += expected_rows;
        report.problems.push(format!("{name}: no such run"));
        return Ok(());
    };
    match status.as_str() {
        "completed" => {}
        "failed" | "cancelled" => {
            report.runs_failed += 1;
            report.rows_lost += expected_rows;
            report.problems.push(format!(
                "{name}: {status}: {}",
                error.as_deref().unwrap_or("no error message")
            ));
            return Ok(());
        }
        _ => {
            report.runs_unfinished += 1;
            report.rows_lost += expected_rows;
            report.problems.push(format!("{name}: still {status}"));
            return Ok(());
        }
    }

    let commits: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "SELECT commit_id, coalesce(row_count, -1), tree_hash FROM dsa_core.commits
          WHERE run_id = $1 AND committed_at IS NOT NULL ORDER BY committed_at",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    let Some((commit_id, row_count, recorded_tree)) = commits.first() else {
        report.rows_lost += expected_rows;
        report
            .problems
            .push(format!("{name}: completed without a finalised commit"));
        return Ok(());
    };
    if commits.len() > 1 {
        let extra: i64 = commits[1..].iter().map(|(_, rows, _)| rows.max(&0)).sum();
        report.rows_duplicated += extra as u64;
        report.problems.push(format!(
            "{name}: {} finalised commits instead of one",
            commits.len()
        ));
    } else {
        report.runs_completed_once += 1;
    }

    let stored: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $1",
    )
    .bind(commit_id)
    .fetch_all(pool)
    .await?;
    report.committed_rows += stored.len() as u64;
    let wanted: HashMap<&str, &[u8; 32]> = expected
        .rows
        .iter()
        .map(|(id, hash)| (id.as_str(), hash))
        .collect();
    let found: HashMap<&str, &[u8]> = stored
        .iter()
        .map(|(id, hash)| (id.as_str(), hash.as_slice()))
        .collect();
    let lost = wanted.keys().filter(|id| !found.contains_key(*id)).count() as u64;
    let extra = found.keys().filter(|id| !wanted.contains_key(*id)).count() as u64;
    let changed = wanted
        .iter()
        .filter(|(id, hash)| {
            found
                .get(*id)
                .is_some_and(|stored| stored != &hash.as_slice())
        })
        .count() as u64;
    report.rows_lost += lost;
    report.rows_duplicated += extra;
    report.rows_changed += changed;
    if lost + extra + changed > 0 {
        report.problems.push(format!(
            "{name}: commit {commit_id} lacks {lost} of the file's rows, has {extra} rows the \
             file does not, and {changed} with other content"
        ));
    }
    if *row_count != expected_rows as i64 {
        report.problems.push(format!(
            "{name}: commit {commit_id} records {row_count} rows, the file has {expected_rows}"
        ));
    }

    let mut ordered: Vec<&(String, Vec<u8>)> = stored.iter().collect();
    ordered.sort_by_cached_key(|(id, _)| expected.order_key(id));
    let mut tree = dsa_ingest::import::hash::TreeHasher::new();
    for (id, hash) in ordered {
        let hash: &[u8; 32] = hash
            .as_slice()
            .try_into()
            .with_context(|| format!("row hash of {id} in {commit_id} is not 32 bytes"))?;
        tree.push(id, hash);
    }
    let recomputed = tree.to_hex();
    let from_file = expected.tree_hash();
    if recomputed == from_file && recorded_tree.as_deref() == Some(from_file.as_str()) {
        report.tree_hashes_matching += 1;
    } else {
        report.problems.push(format!(
            "{name}: tree hash from the file {from_file}, from commit_rows {recomputed}, \
             recorded {recorded_tree:?}"
        ));
    }

    let rejects: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dsa_jobs.rejected_rows WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(pool)
            .await?;
    report.expected_rejects += expected.bad_rows;
    report.recorded_rejects += rejects as u64;
    if rejects as u64 != expected.bad_rows {
        report.problems.push(format!(
            "{name}: {rejects} rejected rows recorded, the file has {} bad rows",
            expected.bad_rows
        ));
    }
    Ok(())
}

/// The dead-letter queue is empty and no import message is left (acknowledgements of
/// the last imports may take a moment to reach the broker).
async fn check_queues(services: &Services, report: &mut Report) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = tokio::task::block_in_place(|| {
            Ok::<_, anyhow::Error>((
                services.rabbitmq.messages_in(DEAD_LETTER_QUEUE)?,
                services.rabbitmq.messages_in(IMPORT_QUEUE)?,
            ))
        });
        match counts {
            Ok((dead, left)) => {
                report.dead_letters = Some(dead);
                report.messages_left = Some(left);
                if (dead == 0 && left == 0) || Instant::now() > deadline {
                    break;
                }
            }
            Err(error) if Instant::now() > deadline => {
                report
                    .problems
                    .push(format!("could not count the broker's messages: {error:#}"));
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if report.dead_letters != Some(0) || report.messages_left != Some(0) {
        report.problems.push(format!(
            "{:?} dead-lettered messages and {:?} import messages left on the broker",
            report.dead_letters, report.messages_left
        ));
    }
}

/// Every dataset is in `dsa_search.datasets_summary` with its current head, once the
/// maintainer has refreshed the view (awaited, with a deadline).
async fn check_search_view(
    pool: &PgPool,
    files: &[ChaosFile],
    report: &mut Report,
) -> anyhow::Result<()> {
    let names: Vec<String> = files.iter().map(ChaosFile::dataset).collect();
    report.datasets = names.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dsa_search.datasets_summary s
               JOIN dsa_core.refs r ON r.dataset_id = s.dataset_id AND r.name = 'main'
              WHERE s.name = ANY($1) AND s.head_commit_id = r.commit_id",
        )
        .bind(&names)
        .fetch_one(pool)
        .await?;
        report.datasets_listed = listed as usize;
        if report.datasets_listed == names.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            report.problems.push(format!(
                "the search view lists {listed} of {} datasets with their head after 60 s",
                names.len()
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ------------------------------------------------------------------------------ table

fn print_table(
    seed: u64,
    args: &Args,
    files: &[ChaosFile],
    submitted: &[Submitted],
    injected: &[Injected],
    effects: &[FaultEffect],
    report: &Report,
) {
    let xlsx = files
        .iter()
        .filter(|file| file.path.extension().is_some_and(|ext| ext == "xlsx"))
        .count();
    let with_bad_rows = files.iter().filter(|file| file.skip_bad_rows).count();
    let duplicates = files.iter().filter(|file| file.duplicate).count();
    println!();
    println!(
        "chaos run, seed {seed}: {} files ({} CSV, {xlsx} xlsx; {with_bad_rows} with bad rows; \
         {duplicates} submitted twice), {} runs, lease {} s",
        files.len(),
        files.len() - xlsx,
        submitted.len(),
        args.lease_seconds
    );
    println!();
    println!(
        "{:<24} {:>8} {:>15} {:>24}",
        "fault", "injected", "runs in flight", "longest wait after (s)"
    );
    let mut total = FaultEffect::default();
    for kind in FaultKind::ALL {
        let mut count = 0;
        let mut effect = FaultEffect::default();
        for (fault, one) in injected.iter().zip(effects) {
            if fault.kind == kind {
                count += 1;
                effect.add(*one);
            }
        }
        total.add(effect);
        let in_flight = effect.runs_in_flight;
        let wait = if in_flight > 0 {
            format!("{:.1}", effect.longest_wait.as_secs_f64())
        } else {
            "-".to_owned()
        };
        println!(
            "{:<24} {:>8} {:>15} {:>24}",
            kind.label(),
            count,
            in_flight,
            wait
        );
    }
    println!(
        "{:<24} {:>8} {:>15} {:>24.1}",
        "all faults",
        injected.len(),
        total.runs_in_flight,
        total.longest_wait.as_secs_f64()
    );
    println!();
    let rows = [
        ("runs submitted", submitted.len().to_string()),
        (
            "runs completed exactly once",
            report.runs_completed_once.to_string(),
        ),
        ("runs failed", report.runs_failed.to_string()),
        ("runs not finished", report.runs_unfinished.to_string()),
        ("runs no submit created", report.unexpected_runs.to_string()),
        (
            "runs claimed more than once",
            format!(
                "{} (at most {} times)",
                report.runs_resumed, report.most_attempts
            ),
        ),
        (
            "rows expected (from files)",
            report.expected_rows.to_string(),
        ),
        ("rows in commits", report.committed_rows.to_string()),
        ("rows lost", report.rows_lost.to_string()),
        ("rows duplicated", report.rows_duplicated.to_string()),
        ("rows with other content", report.rows_changed.to_string()),
        (
            "tree hashes matching",
            format!("{} of {}", report.tree_hashes_matching, submitted.len()),
        ),
        (
            "bad rows rejected",
            format!("{} of {}", report.recorded_rejects, report.expected_rejects),
        ),
        ("unfinished commits", report.unfinished_commits.to_string()),
        ("orphan commit_rows", report.orphan_commit_rows.to_string()),
        (
            "dead-lettered messages",
            count_or_unknown(report.dead_letters),
        ),
        (
            "import messages left",
            count_or_unknown(report.messages_left),
        ),
        (
            "datasets in the search view",
            format!("{} of {}", report.datasets_listed, report.datasets),
        ),
    ];
    for (label, value) in rows {
        println!("{label:<28} {value:>12}");
    }
    println!();
    if report.passed() {
        println!("result: PASS");
    } else {
        println!("result: FAIL ({} problems)", report.problems.len());
        for problem in &report.problems {
            println!("  - {problem}");
        }
    }
}

fn count_or_unknown(count: Option<u64>) -> String {
    count.map_or_else(|| "unknown".to_owned(), |count| count.to_string())
}
