-- The versioned dataset store: content-addressed rows shared by every dataset,
-- commits that are full snapshots, and named refs (branches) pointing at commits.
CREATE SCHEMA IF NOT EXISTS dsa_core;

CREATE TABLE dsa_core.datasets (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A row is written once, ever: the key is sha256 of the row's RFC 8785 canonical JSON.
CREATE TABLE dsa_core.rows (
    row_hash   bytea PRIMARY KEY CHECK (octet_length(row_hash) = 32),
    data       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- committed_at stays NULL while an import is still loading the commit's rows; a
-- commit is visible history only once it is finalised and a ref points at it.
CREATE TABLE dsa_core.commits (
    commit_id        text COLLATE "C" PRIMARY KEY,
    dataset_id       bigint NOT NULL REFERENCES dsa_core.datasets (id),
    parent_commit_id text REFERENCES dsa_core.commits (commit_id),
    message          text NOT NULL,
    author_id        text,
    authored_at      timestamptz NOT NULL DEFAULT now(),
    committed_at     timestamptz,
    row_count        bigint,
    tree_hash        text,
    source           jsonb,
    run_id           uuid
);

-- History walks (`log`) follow the parent link per dataset, newest first.
CREATE INDEX commits_dataset_committed_idx ON dsa_core.commits (dataset_id, committed_at DESC);

-- No foreign keys on purpose: this is the table every imported row lands in, and a
-- per-row key check (to commits or to rows) costs more than the insert itself. The
-- import writes a batch's rows and its commit_rows in one transaction, and removes an
-- unfinalised commit's entries itself when a run fails. Byte-wise ("C") collation keeps
-- the primary key's comparisons to memcmp.
CREATE TABLE dsa_core.commit_rows (
    commit_id      text COLLATE "C" NOT NULL,
    logical_row_id text COLLATE "C" NOT NULL,
    row_hash       bytea NOT NULL,
    PRIMARY KEY (commit_id, logical_row_id)
);

CREATE TABLE dsa_core.refs (
    dataset_id bigint NOT NULL REFERENCES dsa_core.datasets (id),
    name       text NOT NULL,
    commit_id  text NOT NULL REFERENCES dsa_core.commits (commit_id),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_id, name)
);
