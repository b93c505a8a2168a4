-- Import and maintenance runs: what was asked, how far it got, who holds it now.
CREATE SCHEMA IF NOT EXISTS dsa_jobs;

CREATE TYPE dsa_jobs.analysis_run_status AS ENUM ('pending', 'running', 'completed', 'failed', 'cancelled');
CREATE TYPE dsa_jobs.analysis_run_type AS ENUM ('import', 'maintenance');

CREATE TABLE dsa_jobs.analysis_runs (
    id               uuid PRIMARY KEY,
    run_type         dsa_jobs.analysis_run_type NOT NULL,
    status           dsa_jobs.analysis_run_status NOT NULL DEFAULT 'pending',
    dataset_id       bigint REFERENCES dsa_core.datasets (id),
    user_id          text,
    run_parameters   jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Bytes-based progress for people and dashboards; written every few batches.
    progress         jsonb,
    -- Where a resumed run continues; written in the same transaction as each batch.
    checkpoint       jsonb,
    output_summary   jsonb,
    error_message    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    -- The lease: a worker may write batches only while lease_token matches the token it
    -- claimed (a fencing token); a claim after expiry increments it.
    lease_owner      text,
    lease_token      bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    -- A request from another system is turned into a run once per idempotency key.
    idempotency_key  text UNIQUE
);

CREATE INDEX analysis_runs_dataset_idx ON dsa_jobs.analysis_runs (dataset_id, created_at DESC);

-- Rows that a run asked to skip instead of failing on.
CREATE TABLE dsa_jobs.rejected_rows (
    id          bigserial PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES dsa_jobs.analysis_runs (id) ON DELETE CASCADE,
    sheet       text NOT NULL,
    line        bigint NOT NULL,
    byte_offset bigint NOT NULL,
    "column"    integer,
    error       text NOT NULL,
    raw         bytea,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rejected_rows_run_idx ON dsa_jobs.rejected_rows (run_id, line);

-- Messages that must follow a commit: written in the finalising transaction and
-- published afterwards, so a crash between the two loses nothing.
CREATE TABLE dsa_jobs.outbox (
    id           bigserial PRIMARY KEY,
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);

CREATE INDEX outbox_unsent_idx ON dsa_jobs.outbox (id) WHERE sent_at IS NULL;
