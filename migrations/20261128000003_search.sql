-- One row per dataset for search pages; refreshed CONCURRENTLY by the maintenance
-- consumer, which needs the unique index below.
CREATE SCHEMA IF NOT EXISTS dsa_search;

CREATE MATERIALIZED VIEW dsa_search.datasets_summary AS
SELECT d.id AS dataset_id,
       d.name,
       d.description,
       r.commit_id AS head_commit_id,
       c.row_count,
       c.committed_at AS last_commit_at,
       (SELECT max(a.completed_at)
          FROM dsa_jobs.analysis_runs a
         WHERE a.dataset_id = d.id AND a.run_type = 'import' AND a.status = 'completed') AS last_import_at
  FROM dsa_core.datasets d
  LEFT JOIN dsa_core.refs r ON r.dataset_id = d.id AND r.name = 'main'
  LEFT JOIN dsa_core.commits c ON c.commit_id = r.commit_id;

CREATE UNIQUE INDEX datasets_summary_dataset_id_idx ON dsa_search.datasets_summary (dataset_id);
