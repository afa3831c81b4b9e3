-- Conversations per site and window, from table `flows` (as flows.sql): siteflow keeps the
-- `sql.top_talkers` largest by bytes per site, direction and window as SQL table `top_talkers`.
--
-- heavy_hitters(capacity, bytes, packets, key, ...) keeps, per group, the `capacity` keys with
-- the most bytes in bounded state, however many conversations a site has. Its guarantee for a
-- group of N bytes: every conversation above N / capacity bytes is listed; `bytes` is never
-- below the true bytes and `bytes - error` never above them, with error <= N / capacity; a group
-- with at most `capacity` conversations is exact (error 0). packets and records count from when
-- the conversation was last admitted (lower bounds). Capacity: a literal from 1 to 4096, at
-- least sql.top_talkers.
--
-- Rules as for flows.sql; the keys may also include src_port, dst_port and exporter (as
-- heavy_hitters keys). Output `site` and `bytes`.
SELECT
    window_start,
    site,
    district,
    level,
    direction,
    t.src_addr AS src_addr,
    t.dst_addr AS dst_addr,
    t.proto    AS proto,
    t.bytes    AS bytes,
    t.packets  AS packets,
    t.records  AS records,
    t.error    AS error
FROM (
    SELECT window_start, site, district, level, direction,
           unnest(heavy_hitters(100, bytes, packets, src_addr, dst_addr, proto)) AS t
    FROM flows
    GROUP BY window_start, site, district, level, direction
)
