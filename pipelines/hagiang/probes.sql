-- Per-site probe quality per window, from table `probes` (one row per probe result; times in
-- seconds, loss as a ratio 0-1). Rules as for flows.sql: GROUP BY window_start; output `site`.
SELECT
    window_start,
    site,
    district,
    level,
    count(*)            AS results,
    avg(rtt_seconds)    AS rtt_seconds,
    max(rtt_seconds)    AS rtt_max_seconds,
    avg(jitter_seconds) AS jitter_seconds,
    max(loss_ratio)     AS loss_max_ratio
FROM probes
GROUP BY window_start, site, district, level
