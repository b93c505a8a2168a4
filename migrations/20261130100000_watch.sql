-- dsa-ingest watch: the objects it has seen (one row per bucket, key and ETag: an object
-- version), and for ordered rules the last key listed.
--
-- An object version is imported once: its run is found by the identity S3 event records
-- use too (analysis_runs.idempotency_key = 's3:{bucket}/{key}@{etag}'), and this table
-- lets a listing tell known versions from new ones a page at a time. Rows older than
-- WATCH_RETENTION_DAYS are removed; an object still in the bucket after that finds its
-- run by the idempotency key and is recorded again, not imported again.
CREATE TABLE dsa_jobs.watched_objects (
    bucket         text NOT NULL,
    key            text NOT NULL,
    -- Without the quotes S3 puts around it.
    etag           text NOT NULL,
    -- The name of the rule that listed it.
    rule           text NOT NULL,
    size_bytes     bigint,
    last_modified  timestamptz,
    -- The run that imports this version (no foreign key: runs may be cleaned up
    -- before these rows).
    run_id         uuid NOT NULL,
    -- Whether this watcher created the run and queued it; false when the run existed
    -- already (an S3 event record named the same version).
    queued         boolean NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    -- What to do with the object once its run completed, or failed: 'delete' or
    -- 'move:{destination key}'; NULL leaves it.
    after_success  text,
    after_failure  text,
    -- When that was done, and what happened ('deleted', 'moved to ...', 'left: ...').
    after_done_at  timestamptz,
    after_result   text,
    PRIMARY KEY (bucket, key, etag)
);

-- The objects whose run's end is still to be acted on.
CREATE INDEX watched_objects_after_pending_idx ON dsa_jobs.watched_objects (first_seen_at)
    WHERE after_done_at IS NULL AND (after_success IS NOT NULL OR after_failure IS NOT NULL);

-- Retention.
CREATE INDEX watched_objects_first_seen_idx ON dsa_jobs.watched_objects (first_seen_at);

-- Rules with `ordered = true` list only after the last key they have dealt with.
CREATE TABLE dsa_jobs.watch_cursors (
    bucket       text NOT NULL,
    prefix       text NOT NULL,
    start_after  text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, prefix)
);
