-- An import stores a batch's new rows in a transaction of its own, beside the batch
-- transaction that writes its commit_rows and checkpoint and commits after it
-- (import/load.rs), so the server works on both at once. How many rows the first one
-- stored waits here until the batch transaction that counts them in the run's
-- checkpoint deletes it: an attempt that stops between the two commits neither loses
-- its count of new rows nor has it counted twice (the resume finds those rows stored).
-- A failed run's rows here are removed with its unfinished commit.
CREATE TABLE dsa_jobs.uncounted_rows (
    -- No foreign key: the row is written beside the batch, not under its lease.
    run_id   uuid NOT NULL,
    new_rows bigint NOT NULL CHECK (new_rows > 0)
);

CREATE INDEX uncounted_rows_run_idx ON dsa_jobs.uncounted_rows (run_id);
