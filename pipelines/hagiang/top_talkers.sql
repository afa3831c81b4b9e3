-- Conversations per site and window, from table `flows` (as flows.sql): siteflow keeps the
-- `sql.top_talkers` largest by bytes per site, direction and window as SQL table `top_talkers`.
-- Rules as for flows.sql; the keys may also include src_addr, dst_addr, proto, src_port,
-- dst_port and exporter. Output `site` and `bytes`.
SELECT
    window_start,
    site,
    district,
    level,
    direction,
    src_addr,
    dst_addr,
    proto,
    sum(bytes)   AS bytes,
    sum(packets) AS packets,
    count(*)     AS records
FROM flows
GROUP BY window_start, site, district, level, direction, src_addr, dst_addr, proto
