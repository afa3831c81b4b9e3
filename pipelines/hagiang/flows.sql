-- Per-site traffic per window, from table `flows` (one row per flow record, already tied to a
-- site and direction, bytes and packets already multiplied by the sampling rate).
-- siteflow runs this as a partial aggregate per micro-batch and a final one per closed window.
-- Rules: GROUP BY window_start (plus any keys); output `site` and `direction`.
-- Every numeric column becomes a metric (see README: "What /metrics shows").
SELECT
    window_start,
    site,
    district,
    level,
    direction,
    sum(bytes)   AS bytes,
    sum(packets) AS packets,
    sum(flows)   AS flows,
    count(*)     AS records
FROM flows
GROUP BY window_start, site, district, level, direction
