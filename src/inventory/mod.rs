//! The site inventory: which prefixes and exporters belong to which of the sites.
//!
//! Loaded from a CSV file with the columns of `pipelines/hagiang/sites.csv`:
//! `site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter`, plus an
//! optional `exporter_ifindex` column for sites reached through an interface of a shared router.
//! `prefix` may hold several IPv4/IPv6 prefixes separated by spaces or `;`.

pub mod lpm;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

pub use lpm::{Addr, PrefixTable, addr_from_ip, ip_from_addr};

/// The Hà Giang inventory, built into the binary so `siteflow demo` runs anywhere.
pub const EMBEDDED_HAGIANG_CSV: &str = include_str!("../../pipelines/hagiang/sites.csv");

/// Index of a site in the inventory (fits the 242 sites of a province with room to spare).
pub type SiteIdx = u16;

/// Levels of the administrative hierarchy a site can sit at.
pub const LEVELS: [&str; 3] = ["province", "district", "commune"];

/// `district` label of sites that belong to the province itself rather than a district.
pub const PROVINCE_DISTRICT_LABEL: &str = "province";

/// One site of the network.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub id: String,
    pub name: String,
    /// `province`, `district` or `commune`.
    pub level: String,
    pub kind: String,
    pub parent_id: String,
    /// District name, or [`PROVINCE_DISTRICT_LABEL`] for provincial offices.
    pub district: String,
    pub admin_code: String,
    pub link_mbps: u32,
    pub prefixes: Vec<IpNet>,
    pub exporter: Option<IpAddr>,
    pub exporter_ifindex: Option<u32>,
}

impl Site {
    /// Link capacity in bytes per second, one way.
    pub fn capacity_bytes_per_sec(&self) -> f64 {
        f64::from(self.link_mbps) * 1e6 / 8.0
    }
}

/// A problem in the inventory file, naming the file, the line and the field.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{file}: cannot read: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: line {line}: {message}")]
    Row { file: String, line: u64, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    site_id: String,
    name: String,
    level: String,
    kind: String,
    #[serde(default)]
    parent_id: String,
    #[serde(default)]
    district: String,
    #[serde(default)]
    admin_code: String,
    link_mbps: u32,
    prefix: String,
    #[serde(default)]
    exporter: String,
    #[serde(default)]
    exporter_ifindex: Option<u32>,
}

/// Where a flow belongs, as decided by the exporter that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExporterMatch {
    /// The exporter is the site's own router: direction comes from the addresses.
    Site(SiteIdx),
    /// The exporter is a shared router and the flow crossed the site's interface.
    Interface { site: SiteIdx, into_site: bool },
}

/// The sites with lookup tables by prefix, exporter and id.
#[derive(Debug, Clone)]
pub struct Inventory {
    sites: Vec<Site>,
    prefixes: PrefixTable<SiteIdx>,
    exporters: HashMap<Addr, SiteIdx>,
    exporter_interfaces: HashMap<(Addr, u32), SiteIdx>,
    by_id: HashMap<String, SiteIdx>,
}

impl Inventory {
    /// The built-in Hà Giang inventory.
    pub fn embedded() -> Self {
        Self::from_csv_str(EMBEDDED_HAGIANG_CSV, "<embedded>/pipelines/hagiang/sites.csv")
            .expect("the embedded inventory is valid (checked by tests)")
    }

    /// Loads and validates a CSV file.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Io { file: file.clone(), source })?;
        Self::from_csv_str(&text, &file)
    }

    /// Parses and validates CSV text; `file` names it in errors.
    pub fn from_csv_str(text: &str, file: &str) -> Result<Self, InventoryError> {
        let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text.as_bytes());
        let mut inventory = Inventory {
            sites: Vec::new(),
            prefixes: PrefixTable::default(),
            exporters: HashMap::new(),
            exporter_interfaces: HashMap::new(),
            by_id: HashMap::new(),
        };
        let headers =
            reader.headers().map_err(|e| InventoryError::File { file: file.to_string(), message: format!("bad header: {e}") })?.clone();
        for result in reader.records() {
            let row_error = |line: u64, message: String| InventoryError::Row { file: file.to_string(), line, message };
            let record = result.map_err(|e| {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                row_error(line, e.to_string())
            })?;
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            let row: Row = record.deserialize(Some(&headers)).map_err(|e| {
                let message = match e.kind() {
                    csv::ErrorKind::Deserialize { err, .. } => match err.field() {
                        Some(i) => format!("column {} ({}): {}", i + 1, headers.get(i as usize).unwrap_or("?"), err.kind()),
                        None => err.kind().to_string(),
                    },
                    _ => e.to_string(),
                };
                row_error(line, message)
            })?;
            let idx = inventory.sites.len();
            let idx = SiteIdx::try_from(idx).map_err(|_| row_error(line, format!("more than {} sites", SiteIdx::MAX)))?;
            let site = parse_site(row).map_err(|m| row_error(line, m))?;
            for net in &site.prefixes {
                inventory
                    .prefixes
                    .insert(*net, idx)
                    .map_err(|d| row_error(line, format!("field prefix: {} is already assigned to another site", d.0)))?;
            }
            if let Some(exporter) = site.exporter {
                let key = addr_from_ip(exporter);
                let taken = match site.exporter_ifindex {
                    Some(ifindex) => inventory.exporter_interfaces.insert((key, ifindex), idx).is_some(),
                    None => inventory.exporters.insert(key, idx).is_some(),
                };
                if taken {
                    return Err(row_error(line, format!("field exporter: {exporter} is already the exporter of another site")));
                }
            }
            if inventory.by_id.insert(site.id.clone(), idx).is_some() {
                return Err(row_error(line, format!("field site_id: duplicate site id {:?}", site.id)));
            }
            inventory.sites.push(site);
        }
        if inventory.sites.is_empty() {
            return Err(InventoryError::File { file: file.to_string(), message: "no sites".into() });
        }
        Ok(inventory)
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn site(&self, idx: SiteIdx) -> &Site {
        &self.sites[usize::from(idx)]
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    pub fn by_id(&self, id: &str) -> Option<SiteIdx> {
        self.by_id.get(id).copied()
    }

    /// The level names of the sites, in the order they first appear.
    pub fn level_names(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for s in &self.sites {
            if !out.contains(&s.level.as_str()) {
                out.push(&s.level);
            }
        }
        out
    }

    /// Sites of a district and/or a level (`None` matches any), in inventory order.
    pub fn select(&self, district: Option<&str>, level: Option<&str>) -> Vec<SiteIdx> {
        (0..self.sites.len() as SiteIdx)
            .filter(|&s| {
                let site = self.site(s);
                district.is_none_or(|d| site.district == d) && level.is_none_or(|l| site.level == l)
            })
            .collect()
    }

    /// The site whose prefix is the longest match for `addr`.
    #[inline]
    pub fn site_of_addr(&self, addr: Addr) -> Option<SiteIdx> {
        self.prefixes.lookup(addr).copied()
    }

    /// The site an exporter (and the flow's interfaces) stands for, if the exporter is known.
    #[inline]
    pub fn site_of_exporter(&self, exporter: Addr, in_if: u32, out_if: u32) -> Option<ExporterMatch> {
        if !self.exporter_interfaces.is_empty() {
            if let Some(&site) = self.exporter_interfaces.get(&(exporter, out_if)) {
                return Some(ExporterMatch::Interface { site, into_site: true });
            }
            if let Some(&site) = self.exporter_interfaces.get(&(exporter, in_if)) {
                return Some(ExporterMatch::Interface { site, into_site: false });
            }
        }
        self.exporters.get(&exporter).map(|&s| ExporterMatch::Site(s))
    }
}

fn parse_site(row: Row) -> Result<Site, String> {
    if row.site_id.is_empty() {
        return Err("field site_id: empty".into());
    }
    if !LEVELS.contains(&row.level.as_str()) {
        return Err(format!("field level: {:?} is not one of {}", row.level, LEVELS.join(", ")));
    }
    if row.link_mbps == 0 {
        return Err("field link_mbps: must be greater than 0".into());
    }
    let mut prefixes = Vec::new();
    for text in row.prefix.split([' ', ';']).filter(|s| !s.is_empty()) {
        let net: IpNet = text.parse().map_err(|e| format!("field prefix: {text:?} is not an IPv4 or IPv6 prefix ({e})"))?;
        if net.trunc() != net {
            return Err(format!("field prefix: {text:?} has host bits set; did you mean {}?", net.trunc()));
        }
        prefixes.push(net);
    }
    if prefixes.is_empty() {
        return Err("field prefix: empty; every site needs at least one prefix".into());
    }
    let exporter = match row.exporter.as_str() {
        "" => None,
        text => Some(text.parse::<IpAddr>().map_err(|e| format!("field exporter: {text:?} is not an IP address ({e})"))?),
    };
    if row.exporter_ifindex.is_some() && exporter.is_none() {
        return Err("field exporter_ifindex: set without an exporter".into());
    }
    let district = if row.district.is_empty() { PROVINCE_DISTRICT_LABEL.to_string() } else { row.district };
    Ok(Site {
        id: row.site_id,
        name: row.name,
        level: row.level,
        kind: row.kind,
        parent_id: row.parent_id,
        district,
        admin_code: row.admin_code,
        link_mbps: row.link_mbps,
        prefixes,
        exporter,
        exporter_ifindex: row.exporter_ifindex,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter\n";

    #[test]
    fn embedded_inventory_has_the_242_sites() {
        let inv = Inventory::embedded();
        assert_eq!(inv.len(), 242);
        let communes = inv.sites().iter().filter(|s| s.level == "commune").count();
        assert_eq!(communes, 193);
        assert_eq!(inv.len() - communes, 49);
        let s = inv.by_id("dong-van.ta-lung").unwrap();
        assert_eq!(inv.site_of_addr(addr_from_ip("10.2.21.77".parse().unwrap())), Some(s));
        assert_eq!(inv.site_of_exporter(addr_from_ip("172.16.2.21".parse().unwrap()), 0, 0), Some(ExporterMatch::Site(s)));
        assert_eq!(inv.site(inv.by_id("tinh.vp-ubnd").unwrap()).district, PROVINCE_DISTRICT_LABEL);
    }

    #[test]
    fn bad_prefix_names_line_and_field() {
        let csv =
            format!("{HEADER}a,A,commune,commune,,D,1,20,10.1.1.0/24,172.16.0.1\nb,B,commune,commune,,D,2,20,10.1.300.0/24,172.16.0.2\n");
        let err = Inventory::from_csv_str(&csv, "sites.csv").unwrap_err().to_string();
        assert!(err.contains("sites.csv: line 3: field prefix: \"10.1.300.0/24\""), "{err}");
    }

    #[test]
    fn host_bits_and_duplicates_are_rejected() {
        let csv = format!("{HEADER}a,A,commune,commune,,D,1,20,10.1.1.5/24,\n");
        let err = Inventory::from_csv_str(&csv, "s.csv").unwrap_err().to_string();
        assert!(err.contains("did you mean 10.1.1.0/24"), "{err}");
        let csv = format!("{HEADER}a,A,commune,commune,,D,1,20,10.1.1.0/24,\nb,B,commune,commune,,D,1,20,10.1.1.0/24,\n");
        let err = Inventory::from_csv_str(&csv, "s.csv").unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("already assigned"), "{err}");
        let csv = format!("{HEADER}a,A,commune,commune,,D,1,twenty,10.1.1.0/24,\n");
        let err = Inventory::from_csv_str(&csv, "s.csv").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("column 8"), "{err}");
    }

    #[test]
    fn several_prefixes_and_interfaces() {
        let csv = "site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter,exporter_ifindex\n\
                   a,A,commune,commune,,D,1,20,10.1.1.0/24 2001:db8:1::/48,172.16.0.1,7\n\
                   b,B,commune,commune,,D,1,20,10.1.2.0/24,172.16.0.1,8\n";
        let inv = Inventory::from_csv_str(csv, "s.csv").unwrap();
        assert_eq!(inv.site_of_addr(addr_from_ip("2001:db8:1::9".parse().unwrap())), Some(0));
        let router = addr_from_ip("172.16.0.1".parse().unwrap());
        assert_eq!(inv.site_of_exporter(router, 1, 8), Some(ExporterMatch::Interface { site: 1, into_site: true }));
        assert_eq!(inv.site_of_exporter(router, 7, 1), Some(ExporterMatch::Interface { site: 0, into_site: false }));
        assert_eq!(inv.site_of_exporter(router, 1, 2), None);
    }
}
