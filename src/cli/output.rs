//! What the commands print for people.

use crate::import::ImportSummary;
use crate::runs::RunStatus;

pub fn print_summary(summary: &ImportSummary) {
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
    for sheet in summary.source.sheets() {
        println!(
            "sheet      {} ({}): {} rows, {} columns",
            sheet.name,
            sheet.visibility,
            sheet.rows,
            sheet.columns.len()
        );
    }
    for change in &summary.header_changes {
        println!(
            "header     column {} {:?} renamed to {:?} ({:?})",
            change.column, change.original, change.name, change.reason
        );
    }
}

pub fn print_status(run: &RunStatus) {
    println!("run        {} ({})", run.run_id, run.run_type);
    println!("status     {}", run.status);
    if let Some(dataset) = &run.dataset {
        println!("dataset    {dataset}");
    }
    if let Some(progress) = run.progress.as_deref() {
        if !progress.status.is_empty() {
            println!("progress   {}", progress.status);
        }
    }
    if let Some(checkpoint) = run.checkpoint.as_deref() {
        let in_sheets = !checkpoint.completed_sheets.is_empty()
            || checkpoint.sheet_index > 0
            || checkpoint.sheet_records > 0;
        if in_sheets {
            // A spreadsheet resumes from a sheet and row; its byte offset is an estimate.
            println!(
                "checkpoint sheet {:?} (number {}), row {} ({} rows loaded)",
                checkpoint.sheet,
                checkpoint.sheet_index + 1,
                checkpoint.sheet_records,
                checkpoint.loaded_rows
            );
        } else {
            println!(
                "checkpoint byte {} ({} rows loaded)",
                checkpoint.byte_offset, checkpoint.loaded_rows
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
