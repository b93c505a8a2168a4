-- Row identity by key: a dataset remembers the columns that identify its rows, set by
-- its first keyed import (or a replace with --rekey). NULL: rows are identified by
-- their position ({sheet}:{n}).
ALTER TABLE dsa_core.datasets ADD COLUMN key_columns text[];
