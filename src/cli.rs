//! The command line: parses arguments, wires settings to the import core, prints results.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::claim::ImportParameters;
use crate::config::Settings;
use crate::db::{self, DatasetName};
use crate::fetch::SourceLocation;
use crate::import::{ImportSummary, Importer};

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
    /// Put rows that cannot be decoded into dsa_jobs.rejected_rows instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
    /// The commit message (default: "Import <source>").
    #[arg(long)]
    message: Option<String>,
    /// Who asked for the import, recorded on the run.
    #[arg(long)]
    user: Option<String>,
    /// For a spreadsheet: import only this worksheet (repeat for several; default: all).
    #[arg(long = "sheet", value_name = "NAME", conflicts_with = "resume")]
    sheets: Vec<String>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs the command; errors are printed here, once, and become the exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let pool = db::connect(&settings.database_url, 4)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                redact(&settings.database_url)
            )
        })?;
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
        Command::Status { run_id, json } => {
            let Some(run) = crate::status::run_status(&pool, run_id).await? else {
                anyhow::bail!("run {run_id} does not exist");
            };
            if json {
                println!("{}", serde_json::to_string(&run)?);
            } else {
                print_status(&run);
            }
        }
    }
    Ok(())
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
    let importer = Importer::new(pool, s3, settings.import.clone());
    let run_id = match (args.resume, args.source, args.dataset) {
        (Some(run_id), _, _) => run_id,
        (None, Some(source), Some(dataset)) => {
            let dataset = DatasetName::parse(&dataset)?;
            let parameters = ImportParameters {
                source,
                skip_bad_rows: args.skip_bad_rows,
                message: args.message,
                sheets: (!args.sheets.is_empty()).then_some(args.sheets),
            };
            let (run_id, _) = importer
                .create_run(&dataset, args.user.as_deref(), &parameters)
                .await?;
            run_id
        }
        _ => anyhow::bail!("give --dataset NAME and SOURCE, or --resume RUN_ID"),
    };
    let summary = importer
        .run(run_id)
        .await
        .with_context(|| format!("import run {run_id}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn print_summary(summary: &ImportSummary) {
    println!("run        {}", summary.run_id);
    println!("commit     {}", summary.commit_id);
    println!(
        "parent     {}",
        summary
            .parent_commit_id
            .as_deref()
            .unwrap_or("(none: first commit)")
    );
    println!(
        "rows       {} ({} newly stored, {} rejected)",
        summary.rows, summary.new_rows, summary.rejected_rows
    );
    println!(
        "bytes      {} ({} read by this attempt)",
        summary.bytes, summary.bytes_read
    );
    println!(
        "seconds    {:.2} ({:.0} rows/s)",
        summary.seconds, summary.rows_per_second
    );
    println!("tree hash  {}", summary.tree_hash);
    if let Some(sheets) = summary
        .source
        .get("sheets")
        .and_then(|sheets| sheets.as_array())
    {
        for sheet in sheets {
            println!(
                "sheet      {} ({}): {} rows, {} columns",
                sheet["name"].as_str().unwrap_or("?"),
                sheet["visibility"].as_str().unwrap_or("?"),
                sheet["rows"],
                sheet["columns"].as_array().map_or(0, Vec::len)
            );
        }
    }
    for change in &summary.header_changes {
        println!(
            "header     column {} {:?} renamed to {:?} ({:?})",
            change.column, change.original, change.name, change.reason
        );
    }
}

fn print_status(run: &crate::status::RunStatus) {
    println!("run        {} ({})", run.run_id, run.run_type);
    println!("status     {}", run.status);
    if let Some(dataset) = &run.dataset {
        println!("dataset    {dataset}");
    }
    let line = |key: &str| {
        run.progress
            .as_ref()
            .and_then(|progress| progress.get(key))
            .and_then(|value| value.as_str().map(str::to_owned))
    };
    if let Some(status_line) = line("status") {
        println!("progress   {status_line}");
    }
    if let Some(checkpoint) = &run.checkpoint {
        let in_sheets = checkpoint.get("completed_sheets").is_some()
            || checkpoint["sheet_index"].as_u64().unwrap_or(0) > 0
            || checkpoint["sheet_records"].as_u64().unwrap_or(0) > 0;
        if in_sheets {
            // A spreadsheet resumes from a sheet and row; its byte offset is an estimate.
            println!(
                "checkpoint sheet {} (number {}), row {} ({} rows loaded)",
                checkpoint["sheet"],
                checkpoint["sheet_index"].as_u64().unwrap_or(0) + 1,
                checkpoint["sheet_records"],
                checkpoint["loaded_rows"]
            );
        } else {
            println!(
                "checkpoint byte {} ({} rows loaded)",
                checkpoint["byte_offset"], checkpoint["loaded_rows"]
            );
        }
    }
    if let Some(owner) = &run.lease_owner {
        let until = run
            .lease_expires_at
            .map(|until| until.to_rfc3339())
            .unwrap_or_default();
        println!("held by    {owner} until {until}");
    }
    if let Some(summary) = &run.output_summary {
        println!(
            "commit     {} ({} rows, {} newly stored)",
            summary["commit_id"].as_str().unwrap_or("?"),
            summary["rows"],
            summary["new_rows"]
        );
    }
    if let Some(error) = &run.error_message {
        println!("error      {error}");
    }
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
