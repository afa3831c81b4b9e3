-- Per-site interface traffic per window, from table `interfaces`: one row per counter sample
-- and direction (`in` = received by the interface, `out` = sent), with the bytes since the
-- interface's previous sample and the seconds between the two (wraps and resets handled).
-- Rules as for flows.sql: GROUP BY window_start; output `site`. `interface`, `device` and
-- `direction` may also be keys: one row per site, interface and direction per window.
SELECT
    window_start,
    site,
    district,
    level,
    interface,
    direction,
    sum(bytes)                AS bytes,
    sum(bytes) / sum(seconds) AS bytes_per_second,
    count(*)                  AS samples
FROM interfaces
GROUP BY window_start, site, district, level, interface, direction
