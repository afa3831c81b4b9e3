//! Enrichment: ties each decoded record to a site and direction, and corrects flows for sampling.
//!
//! Site labels are dictionary columns whose keys are the site index: `site`, `district` and
//! `level` share one key array, so tagging a record costs two bytes, not three strings.
//!
//! Which site and direction a flow belongs to:
//! 1. the exporter is a site's interface on a shared router → that site; into the site when the
//!    flow left the router through that interface;
//! 2. the exporter is a site's own router → that site, whatever the flow's addresses (transit,
//!    NAT, non-IP); into the site when the destination is in the site's prefixes, out of it when
//!    the source is; otherwise into the site when the flow entered the router through its
//!    `uplink_ifindex`, out when it left through it; failing all that, into the site (counted
//!    in [`EnrichStats::direction_defaulted`]);
//! 3. the exporter is unknown → the site of the destination (into), else of the source (out).
//!
//! Anything else is not counted toward a site: flows without addresses (non-IP) as
//! [`EnrichStats::not_ip`] with their bytes, the others (addresses of no site) as unmatched.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, DictionaryArray, PrimitiveArray, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{SchemaRef, UInt8Type, UInt16Type, UInt32Type, UInt64Type};

use crate::decode::NO_ADDR;

use crate::inventory::{Addr, ExporterMatch, Inventory, SiteIdx};
use crate::schema::{enriched_flow_schema, enriched_interface_schema, enriched_probe_schema, flow_schema};

/// Direction of traffic relative to the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Towards the site (download).
    In = 0,
    /// Away from the site (upload).
    Out = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::In, Direction::Out];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// Counts from one enriched batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EnrichStats {
    /// Records with addresses that belong to no site.
    pub unmatched: u64,
    /// Flows without addresses (non-IP) from an exporter of no site.
    pub not_ip: u64,
    /// ... and their bytes, corrected for sampling.
    pub not_ip_bytes: u64,
    /// Flows of a site's router whose direction neither the site's prefixes nor its uplink
    /// interface tell: counted into the site.
    pub direction_defaulted: u64,
}

/// Where a flow belongs (see the module's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Site(SiteIdx, Direction),
    /// A site's router exported it, and nothing tells its direction: into the site.
    DefaultDirection(SiteIdx),
    /// No addresses (a non-IP flow) and an exporter of no site.
    NotIp,
    Unmatched,
}

/// Sampling correction settings.
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    /// Rate applied to records that carry none (0).
    pub default_rate: u32,
    /// Per-exporter rates that replace whatever the records carry.
    pub overrides: HashMap<Addr, u32>,
}

/// Ties records to sites. Built once; cheap to call per batch.
#[derive(Debug, Clone)]
pub struct Enricher {
    inventory: Arc<Inventory>,
    sampling: Sampling,
    site_values: ArrayRef,
    district_values: ArrayRef,
    level_values: ArrayRef,
    direction_values: ArrayRef,
}

fn addr_at(col: &[u8], i: usize) -> Addr {
    let bytes: [u8; 16] = col[i * 16..i * 16 + 16].try_into().expect("16-byte address");
    u128::from_be_bytes(bytes)
}

impl Enricher {
    pub fn new(inventory: Arc<Inventory>, sampling: Sampling) -> Self {
        let strings = |f: fn(&crate::inventory::Site) -> &str| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(inventory.sites().iter().map(f)))
        };
        Self {
            site_values: strings(|s| &s.id),
            district_values: strings(|s| &s.district),
            level_values: strings(|s| &s.level),
            direction_values: Arc::new(StringArray::from_iter_values(Direction::ALL.iter().map(|d| d.as_str()))),
            inventory,
            sampling,
        }
    }

    pub fn inventory(&self) -> &Arc<Inventory> {
        &self.inventory
    }

    /// The site and direction of one flow, if it belongs to a site.
    pub fn classify(&self, exporter: Addr, src: Addr, dst: Addr, in_if: u32, out_if: u32) -> Option<(SiteIdx, Direction)> {
        match self.place(exporter, src, dst, in_if, out_if) {
            Placement::Site(site, dir) => Some((site, dir)),
            Placement::DefaultDirection(site) => Some((site, Direction::In)),
            Placement::NotIp | Placement::Unmatched => None,
        }
    }

    /// Where one flow belongs ([`NO_ADDR`] for an address it does not have).
    #[inline]
    pub fn place(&self, exporter: Addr, src: Addr, dst: Addr, in_if: u32, out_if: u32) -> Placement {
        let inv = &self.inventory;
        let site_of = |addr: Addr| if addr == NO_ADDR { None } else { inv.site_of_addr(addr) };
        match inv.site_of_exporter(exporter, in_if, out_if) {
            Some(ExporterMatch::Interface { site, into_site }) => {
                Placement::Site(site, if into_site { Direction::In } else { Direction::Out })
            }
            Some(ExporterMatch::Site(site)) => {
                if site_of(dst) == Some(site) {
                    Placement::Site(site, Direction::In)
                } else if site_of(src) == Some(site) {
                    Placement::Site(site, Direction::Out)
                } else {
                    match inv.site(site).uplink_ifindex {
                        Some(uplink) if in_if == uplink => Placement::Site(site, Direction::In),
                        Some(uplink) if out_if == uplink => Placement::Site(site, Direction::Out),
                        _ => Placement::DefaultDirection(site),
                    }
                }
            }
            None if src == NO_ADDR && dst == NO_ADDR => Placement::NotIp,
            None => match site_of(dst) {
                Some(site) => Placement::Site(site, Direction::In),
                None => site_of(src).map_or(Placement::Unmatched, |site| Placement::Site(site, Direction::Out)),
            },
        }
    }

    fn site_columns(&self, keys: Vec<SiteIdx>) -> [ArrayRef; 3] {
        let keys = PrimitiveArray::<UInt16Type>::new(keys.into(), None);
        let dict = |values: &ArrayRef| -> ArrayRef {
            Arc::new(DictionaryArray::<UInt16Type>::try_new(keys.clone(), values.clone()).expect("keys index the sites"))
        };
        [dict(&self.site_values), dict(&self.district_values), dict(&self.level_values)]
    }

    /// Enriches decoded flows (schema [`flow_schema`]) into [`enriched_flow_schema`].
    pub fn enrich_flows(&self, batch: &RecordBatch) -> (RecordBatch, EnrichStats) {
        let col = |name: &str| batch.column_by_name(name).expect("flow_schema column");
        let fixed = |name: &str| col(name).as_fixed_size_binary().values().clone();
        let (exporter, src, dst) = (fixed("exporter"), fixed("src_addr"), fixed("dst_addr"));
        let in_if = col("in_if").as_primitive::<UInt32Type>().values();
        let out_if = col("out_if").as_primitive::<UInt32Type>().values();
        let bytes = col("bytes").as_primitive::<UInt64Type>().values();
        let packets = col("packets").as_primitive::<UInt64Type>().values();
        let rates = col("sampling_rate").as_primitive::<UInt32Type>().values();

        let n = batch.num_rows();
        let mut keep: Vec<u32> = Vec::with_capacity(n);
        let mut site_keys: Vec<SiteIdx> = Vec::with_capacity(n);
        let mut dir_keys: Vec<u8> = Vec::with_capacity(n);
        let mut scaled_bytes: Vec<u64> = Vec::with_capacity(n);
        let mut scaled_packets: Vec<u64> = Vec::with_capacity(n);
        let mut applied_rates: Vec<u32> = Vec::with_capacity(n);
        let has_overrides = !self.sampling.overrides.is_empty();
        let mut stats = EnrichStats::default();
        for i in 0..n {
            let exp = addr_at(&exporter, i);
            let override_rate = if has_overrides { self.sampling.overrides.get(&exp).copied() } else { None };
            let rate = match (override_rate, rates[i]) {
                (Some(r), _) => r,
                (None, 0) => self.sampling.default_rate,
                (None, r) => r,
            };
            let (site, dir) = match self.place(exp, addr_at(&src, i), addr_at(&dst, i), in_if[i], out_if[i]) {
                Placement::Site(site, dir) => (site, dir),
                Placement::DefaultDirection(site) => {
                    stats.direction_defaulted += 1;
                    (site, Direction::In)
                }
                Placement::NotIp => {
                    stats.not_ip += 1;
                    stats.not_ip_bytes += bytes[i].saturating_mul(u64::from(rate));
                    continue;
                }
                Placement::Unmatched => {
                    stats.unmatched += 1;
                    continue;
                }
            };
            keep.push(i as u32);
            site_keys.push(site);
            dir_keys.push(dir as u8);
            scaled_bytes.push(bytes[i].saturating_mul(u64::from(rate)));
            scaled_packets.push(packets[i].saturating_mul(u64::from(rate)));
            applied_rates.push(rate);
        }

        let all_kept = keep.len() == n;
        let keep = UInt32Array::from(keep);
        let pick = |name: &str| -> ArrayRef {
            let c = col(name);
            if all_kept { c.clone() } else { take(c.as_ref(), &keep, None).expect("indices in range") }
        };
        let [site, district, level] = self.site_columns(site_keys);
        let direction = Arc::new(
            DictionaryArray::<UInt8Type>::try_new(PrimitiveArray::new(dir_keys.into(), None), self.direction_values.clone())
                .expect("direction keys are 0 or 1"),
        );
        let mut columns: Vec<ArrayRef> = vec![site, district, level, direction];
        for field in flow_schema().fields() {
            let name = field.name().as_str();
            columns.push(match name {
                "bytes" => Arc::new(PrimitiveArray::<UInt64Type>::new(std::mem::take(&mut scaled_bytes).into(), None)),
                "packets" => Arc::new(PrimitiveArray::<UInt64Type>::new(std::mem::take(&mut scaled_packets).into(), None)),
                "sampling_rate" => Arc::new(PrimitiveArray::<UInt32Type>::new(std::mem::take(&mut applied_rates).into(), None)),
                _ => pick(name),
            });
        }
        let out = RecordBatch::try_new(enriched_flow_schema(), columns).expect("columns match enriched_flow_schema");
        (out, stats)
    }

    /// Enriches decoded probe results (schema [`probe_schema`]) into [`enriched_probe_schema`].
    /// The site is the record's site id, else the site whose prefix holds the target address;
    /// results with neither are unmatched.
    pub fn enrich_probes(&self, batch: &RecordBatch) -> (RecordBatch, EnrichStats) {
        let (out, stats, _) = self.enrich_probes_keeping(batch);
        (out, stats)
    }

    /// [`Self::enrich_probes`], also returning the input row of each output row.
    pub fn enrich_probes_keeping(&self, batch: &RecordBatch) -> (RecordBatch, EnrichStats, Vec<u32>) {
        // By site id; failing that, by the probed address (e.g. Telegraf's `url` tag).
        self.enrich_by_site_id(batch, "target", false, None, enriched_probe_schema())
    }

    /// Enriches interface traffic rows ([`interface_traffic_schema`]) into
    /// [`enriched_interface_schema`]; also returns the input row of each output row. The site
    /// is the row's site id, else the site that declares the interface as an uplink (inventory
    /// `uplinks`, e.g. a port of a provider's router), else the site whose router is the
    /// reporting device (an inventory exporter), else the site whose prefix holds the device's
    /// address.
    pub fn enrich_interfaces(&self, batch: &RecordBatch) -> (RecordBatch, EnrichStats, Vec<u32>) {
        let devices = batch.column_by_name("device").expect("device column").as_string::<i32>();
        let interfaces = batch.column_by_name("interface").expect("interface column").as_string::<i32>();
        let uplink = |i: usize| self.inventory.uplink_of(devices.value(i), interfaces.value(i)).map(|(site, _)| site);
        self.enrich_by_site_id(batch, "device", true, Some(&uplink), enriched_interface_schema())
    }

    /// Keeps the rows of `batch` that belong to a site (by `site_id`, else by `declared`, else by
    /// the address in `addr_column`, optionally first as an exporter) and replaces `site_id`
    /// with site labels.
    fn enrich_by_site_id(
        &self,
        batch: &RecordBatch,
        addr_column: &str,
        exporter_first: bool,
        declared: Option<&dyn Fn(usize) -> Option<SiteIdx>>,
        schema: SchemaRef,
    ) -> (RecordBatch, EnrichStats, Vec<u32>) {
        let ids = batch.column_by_name("site_id").expect("site_id column").as_string::<i32>();
        let addrs = batch.column_by_name(addr_column).expect("address column").as_string::<i32>();
        let mut keep = Vec::with_capacity(ids.len());
        let mut site_keys = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let site = id.and_then(|id| self.inventory.by_id(id)).or_else(|| declared.and_then(|d| d(i))).or_else(|| {
                let addr = crate::inventory::addr_from_ip(addrs.value(i).parse::<std::net::IpAddr>().ok()?);
                let as_exporter = match exporter_first.then(|| self.inventory.site_of_exporter(addr, 0, 0)).flatten() {
                    Some(ExporterMatch::Site(site)) => Some(site),
                    _ => None,
                };
                as_exporter.or_else(|| self.inventory.site_of_addr(addr))
            });
            if let Some(site) = site {
                keep.push(i as u32);
                site_keys.push(site);
            }
        }
        let stats = EnrichStats { unmatched: (ids.len() - keep.len()) as u64, ..Default::default() };
        let indices = UInt32Array::from(keep.clone());
        let mut columns: Vec<ArrayRef> = self.site_columns(site_keys).into();
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            if field.name() != "site_id" {
                columns.push(take(column.as_ref(), &indices, None).expect("indices in range"));
            }
        }
        let out = RecordBatch::try_new(schema, columns).expect("columns match the enriched schema");
        (out, stats, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{FlowColumns, FlowRecord};
    use crate::inventory::addr_from_ip;
    use datafusion::arrow::array::AsArray;

    fn a(s: &str) -> Addr {
        addr_from_ip(s.parse().unwrap())
    }

    fn enricher() -> Enricher {
        Enricher::new(Arc::new(Inventory::embedded()), Sampling { default_rate: 1, overrides: HashMap::new() })
    }

    #[test]
    fn direction_from_the_side_of_the_flow() {
        let e = enricher();
        let inv = e.inventory().clone();
        let ta_lung = inv.by_id("dong-van.ta-lung").unwrap();
        let ubnd = inv.by_id("tinh.vp-ubnd").unwrap();
        // Exported by the site's own router.
        assert_eq!(e.classify(a("172.16.2.21"), a("203.0.113.1"), a("10.2.21.9"), 0, 0), Some((ta_lung, Direction::In)));
        assert_eq!(e.classify(a("172.16.2.21"), a("10.2.21.9"), a("10.100.2.7"), 0, 0), Some((ta_lung, Direction::Out)));
        // Unknown exporter: destination site first, then source site.
        assert_eq!(e.classify(a("192.0.2.1"), a("10.2.21.9"), a("10.100.2.7"), 0, 0), Some((ubnd, Direction::In)));
        assert_eq!(e.classify(a("192.0.2.1"), a("10.2.21.9"), a("203.0.113.1"), 0, 0), Some((ta_lung, Direction::Out)));
        // Neither side is a site.
        assert_eq!(e.classify(a("192.0.2.1"), a("198.51.100.1"), a("203.0.113.1"), 0, 0), None);
        // Through a site's router, whatever the addresses: the router's site, into it by default.
        assert_eq!(e.place(a("172.16.2.21"), a("198.51.100.1"), a("10.100.2.7"), 0, 0), Placement::DefaultDirection(ta_lung));
        assert_eq!(e.place(a("172.16.2.21"), NO_ADDR, NO_ADDR, 3, 4), Placement::DefaultDirection(ta_lung));
        // No addresses and no site's exporter: not IP; addresses of no site: unmatched.
        assert_eq!(e.place(a("192.0.2.1"), NO_ADDR, NO_ADDR, 0, 0), Placement::NotIp);
        assert_eq!(e.place(a("192.0.2.1"), NO_ADDR, a("203.0.113.1"), 0, 0), Placement::Unmatched);
        assert_eq!(e.place(a("192.0.2.1"), NO_ADDR, a("10.2.21.9"), 0, 0), Placement::Site(ta_lung, Direction::In));
    }

    #[test]
    fn routers_as_sites_take_their_direction_from_the_uplink() {
        let csv = "site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter,exporter_ifindex,uplink_ifindex\n\
                   r1,R1,commune,commune,,D,1,20,,172.16.0.1,,2\n\
                   r2,R2,commune,commune,,D,2,20,10.9.0.0/24,172.16.0.2,,\n\
                   r3,R3,commune,commune,,D,3,20,,172.16.0.3,7,\n";
        let inv = Arc::new(Inventory::from_csv_str(csv, "s.csv").unwrap());
        let e = Enricher::new(inv, Sampling { default_rate: 1, overrides: HashMap::new() });
        let (r1, r2, r3) = (a("172.16.0.1"), a("172.16.0.2"), a("172.16.0.3"));
        let (x, y) = (a("198.51.100.1"), a("203.0.113.1"));
        assert_eq!(e.place(r1, x, y, 2, 1), Placement::Site(0, Direction::In));
        assert_eq!(e.place(r1, x, y, 1, 2), Placement::Site(0, Direction::Out));
        assert_eq!(e.place(r1, NO_ADDR, NO_ADDR, 1, 2), Placement::Site(0, Direction::Out));
        assert_eq!(e.place(r1, x, y, 1, 3), Placement::DefaultDirection(0));
        // The site's own prefixes come first; then no uplink: the default.
        assert_eq!(e.place(r2, a("10.9.0.5"), y, 2, 1), Placement::Site(1, Direction::Out));
        assert_eq!(e.place(r2, x, y, 2, 1), Placement::DefaultDirection(1));
        // A site on an interface of a shared router: by the interface.
        assert_eq!(e.place(r3, NO_ADDR, NO_ADDR, 1, 7), Placement::Site(2, Direction::In));
        assert_eq!(e.place(r3, x, y, 7, 1), Placement::Site(2, Direction::Out));
    }

    #[test]
    fn flows_are_scaled_and_unmatched_counted() {
        let e = enricher();
        let mut cols = FlowColumns::default();
        let base = FlowRecord {
            event_time_ns: 1,
            exporter: a("172.16.2.21"),
            src_addr: a("203.0.113.1"),
            dst_addr: a("10.2.21.9"),
            bytes: 10,
            packets: 2,
            flows: 1,
            sampling_rate: 100,
            ..Default::default()
        };
        cols.push(&base);
        cols.push(&FlowRecord { exporter: a("192.0.2.1"), src_addr: a("198.51.100.2"), dst_addr: a("198.51.100.1"), ..base });
        cols.push(&FlowRecord { sampling_rate: 0, ..base });
        cols.push(&FlowRecord { exporter: a("192.0.2.1"), src_addr: NO_ADDR, dst_addr: NO_ADDR, bytes: 7, ..base });
        let (out, stats) = e.enrich_flows(&cols.finish());
        assert_eq!(stats, EnrichStats { unmatched: 1, not_ip: 1, not_ip_bytes: 700, direction_defaulted: 0 });
        assert_eq!(out.num_rows(), 2);
        let bytes: Vec<u64> = out.column_by_name("bytes").unwrap().as_primitive::<UInt64Type>().values().to_vec();
        assert_eq!(bytes, vec![1000, 10]);
        let site = out.column_by_name("site").unwrap().as_dictionary::<UInt16Type>();
        let names = site.values().as_string::<i32>();
        assert_eq!(names.value(site.keys().value(0) as usize), "dong-van.ta-lung");
    }

    #[test]
    fn probes_match_by_site_id_or_by_target_address() {
        use crate::decode::{ProbeColumns, ProbeRecord};
        let e = enricher();
        let mut cols = ProbeColumns::default();
        let base = ProbeRecord {
            event_time_ns: 1,
            site_id: "tinh.vp-ubnd",
            target: "mcu",
            rtt_seconds: 0.01,
            jitter_seconds: 0.0,
            loss_ratio: 0.0,
            sent: 1,
        };
        cols.push(&base);
        cols.push(&ProbeRecord { site_id: "", target: "10.2.21.1", ..base.clone() });
        cols.push(&ProbeRecord { site_id: "nowhere", target: "198.51.100.1", ..base.clone() });
        let (out, stats) = e.enrich_probes(&cols.finish());
        assert_eq!(stats.unmatched, 1);
        let site = out.column_by_name("site").unwrap().as_dictionary::<UInt16Type>();
        let names = site.values().as_string::<i32>();
        let got: Vec<&str> = site.keys().values().iter().map(|k| names.value(*k as usize)).collect();
        assert_eq!(got, vec!["tinh.vp-ubnd", "dong-van.ta-lung"]);
    }
}
