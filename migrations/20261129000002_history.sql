-- The read side of the dataset store (dsa-ingest export, verify) and its collector (gc).

-- Raised from inside a query that reads commits back, so that a row whose content is
-- missing stops the query, naming the row, instead of being left out of its result:
-- `coalesce(r.data, dsa_core.missing_row(...))` calls it only for such a row.
CREATE FUNCTION dsa_core.missing_row(commit_id text, logical_row_id text, row_hash bytea)
RETURNS jsonb LANGUAGE plpgsql PARALLEL SAFE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = format(
        'commit %s: row %s has row hash %s, which dsa_core.rows does not hold '
        '(run `dsa-ingest verify`)', commit_id, logical_row_id, encode(row_hash, 'hex'));
END
$$;

-- How many times gc has removed rows. An import's look-up notes the generation before
-- it decides which rows are stored already; the batch that relies on that answer reads
-- it again under the gc lock and, if gc ran in between, checks that the rows it relies
-- on are still there (see ARCHITECTURE.md, "gc and imports in flight").
CREATE TABLE dsa_core.gc_state (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation bigint NOT NULL DEFAULT 0
);
INSERT INTO dsa_core.gc_state DEFAULT VALUES;
