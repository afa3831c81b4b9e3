-- A test-only pipeline table (tests/it/pipeline_sql.rs): bytes and records per site and window,
-- both directions together.
SELECT
    window_start,
    site,
    sum(bytes) AS bytes,
    count(*)   AS records
FROM flows
GROUP BY window_start, site
