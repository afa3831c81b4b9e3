//! The site inventory: which prefixes and exporters belong to which of the sites.
//!
//! Loaded from a CSV file with the columns of `pipelines/hagiang/sites.csv`:
//! `site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter`, plus an
//! optional `exporter_ifindex` column for sites reached through an interface of a shared router
//! and an optional `uplink_ifindex` column: the interface of a site's own router that faces the
//! rest of the network. `prefix` may hold several IPv4/IPv6 prefixes separated by spaces or `;`,
//! or none for a site known by its exporter alone (a router as a site).
//!
//! The hierarchy is data: `level` is any name, `parent_id` another site's id. The levels' order
//! (top first) follows the parents — a parent's level is above its site's — with levels that no
//! parent relates kept in the order they first appear; so `province → district → commune` and
//! the post-2025 `province → commune` both work, with any names. A site without a `district`
//! inherits its nearest ancestor's, else [`PROVINCE_DISTRICT_LABEL`].

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

/// `district` label of sites that belong to the province itself rather than a district.
pub const PROVINCE_DISTRICT_LABEL: &str = "province";

/// One site of the network.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub id: String,
    pub name: String,
    /// Its level in the inventory's hierarchy (e.g. `province`, `district`, `commune`).
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
    /// The interface of the site's own router towards the rest of the network: flows that
    /// enter the router through it go into the site, flows that leave through it go out.
    pub uplink_ifindex: Option<u32>,
    /// The site's WAN uplinks as interface counters report them (`uplinks` column): their
    /// link state makes the site's connection status.
    pub uplinks: Vec<Uplink>,
}

/// A WAN uplink: an interface of a device, named as Telegraf reports them (the device is the
/// `agent_host`/`host` tag, the interface the `ifName`/`interface` tag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uplink {
    pub device: String,
    pub interface: String,
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
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    exporter: String,
    #[serde(default)]
    exporter_ifindex: Option<u32>,
    #[serde(default)]
    uplink_ifindex: Option<u32>,
    #[serde(default)]
    uplinks: String,
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
    /// Level names, top first.
    levels: Vec<String>,
    /// Each site's parent.
    parents: Vec<Option<SiteIdx>>,
    /// Every site's uplinks: the site and the uplink's index among its own.
    uplinks: HashMap<Uplink, (SiteIdx, usize)>,
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
            levels: Vec::new(),
            parents: Vec::new(),
            uplinks: HashMap::new(),
        };
        let mut lines = Vec::new();
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
            for (k, uplink) in site.uplinks.iter().enumerate() {
                if let Some((other, _)) = inventory.uplinks.insert(uplink.clone(), (idx, k)) {
                    let other = &inventory.sites[usize::from(other)].id;
                    return Err(row_error(
                        line,
                        format!("field uplinks: {}@{} is already an uplink of site {other:?}", uplink.interface, uplink.device),
                    ));
                }
            }
            if inventory.by_id.insert(site.id.clone(), idx).is_some() {
                return Err(row_error(line, format!("field site_id: duplicate site id {:?}", site.id)));
            }
            inventory.sites.push(site);
            lines.push(line);
        }
        if inventory.sites.is_empty() {
            return Err(InventoryError::File { file: file.to_string(), message: "no sites".into() });
        }
        inventory.link_hierarchy().map_err(|(i, message)| InventoryError::Row { file: file.to_string(), line: lines[i], message })?;
        Ok(inventory)
    }

    /// Resolves parents, checks the hierarchy (no cycles, a parent's level above its site's),
    /// orders the levels and fills inherited districts. Errors name the site's index.
    fn link_hierarchy(&mut self) -> Result<(), (usize, String)> {
        let n = self.sites.len();
        self.parents = Vec::with_capacity(n);
        for (i, s) in self.sites.iter().enumerate() {
            let parent = match s.parent_id.as_str() {
                "" => None,
                id => Some(self.by_id(id).ok_or_else(|| (i, format!("field parent_id: {id:?} is not a site of the inventory")))?),
            };
            if parent == Some(i as SiteIdx) {
                return Err((i, "field parent_id: a site cannot be its own parent".into()));
            }
            self.parents.push(parent);
        }
        for i in 0..n {
            let mut at = self.parents[i];
            for _ in 0..n {
                match at {
                    Some(p) if usize::from(p) == i => {
                        return Err((i, format!("field parent_id: {:?} is its own ancestor (a cycle)", self.sites[i].id)));
                    }
                    Some(p) => at = self.parents[usize::from(p)],
                    None => break,
                }
            }
        }
        // Levels in order of first appearance; `above[a]` holds the levels directly below a.
        let mut names: Vec<&str> = Vec::new();
        for s in &self.sites {
            if !names.contains(&s.level.as_str()) {
                names.push(&s.level);
            }
        }
        let pos = |l: &str| names.iter().position(|n| *n == l).expect("listed");
        let mut below: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
        for (i, p) in self.parents.iter().enumerate() {
            let Some(p) = p else { continue };
            let (pl, cl) = (pos(&self.sites[usize::from(*p)].level), pos(&self.sites[i].level));
            if pl == cl {
                return Err((
                    i,
                    format!("field parent_id: parent {:?} is at the same level ({})", self.sites[usize::from(*p)].id, names[cl]),
                ));
            }
            if !below[pl].contains(&cl) {
                below[pl].push(cl);
            }
        }
        // Topological order, earliest-appearing level first among those free to go.
        let mut incoming = vec![0; names.len()];
        for b in &below {
            for &c in b {
                incoming[c] += 1;
            }
        }
        let mut order = Vec::new();
        while let Some(next) = (0..names.len()).find(|&l| incoming[l] == 0 && !order.contains(&l)) {
            order.push(next);
            for &c in &below[next] {
                incoming[c] -= 1;
            }
        }
        if order.len() < names.len() {
            let stuck: Vec<&str> = (0..names.len()).filter(|l| !order.contains(l)).map(|l| names[l]).collect();
            let i = self.sites.iter().position(|s| s.level == stuck[0]).unwrap_or(0);
            return Err((i, format!("field parent_id: levels {} are each above the other through parents", stuck.join(", "))));
        }
        self.levels = order.into_iter().map(|l| names[l].to_string()).collect();
        // Districts: the site's own, else its nearest ancestor's, else the province's label.
        for i in 0..n {
            if !self.sites[i].district.is_empty() {
                continue;
            }
            let inherited = self.ancestors(i as SiteIdx).map(|a| &self.sites[usize::from(a)].district).find(|d| !d.is_empty()).cloned();
            self.sites[i].district = inherited.unwrap_or_else(|| PROVINCE_DISTRICT_LABEL.to_string());
        }
        Ok(())
    }

    /// Level names, top first (e.g. `province`, `district`, `commune`).
    pub fn levels(&self) -> &[String] {
        &self.levels
    }

    /// Position of a level from the top (0), if the inventory has it.
    pub fn level_depth(&self, level: &str) -> Option<usize> {
        self.levels.iter().position(|l| l == level)
    }

    /// The site and the index among its uplinks of the interface `interface` of `device`.
    pub fn uplink_of(&self, device: &str, interface: &str) -> Option<(SiteIdx, usize)> {
        // Keyed by owned strings: a lookup per counter sample, a few per site and minute.
        self.uplinks.get(&Uplink { device: device.to_string(), interface: interface.to_string() }).copied()
    }

    /// The site's parent, if it has one.
    pub fn parent(&self, site: SiteIdx) -> Option<SiteIdx> {
        self.parents[usize::from(site)]
    }

    /// The site's ancestors, nearest first.
    pub fn ancestors(&self, site: SiteIdx) -> impl Iterator<Item = SiteIdx> + '_ {
        std::iter::successors(self.parent(site), |&p| self.parent(p))
    }

    /// Whether `site` is below `ancestor` (at any depth).
    pub fn is_under(&self, site: SiteIdx, ancestor: SiteIdx) -> bool {
        self.ancestors(site).any(|a| a == ancestor)
    }

    /// Sites that have sites below them, in inventory order.
    pub fn parents_with_children(&self) -> Vec<SiteIdx> {
        (0..self.sites.len() as SiteIdx).filter(|&s| self.parents.contains(&Some(s))).collect()
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

    /// Sites of a district, a level and/or below a site (`None` matches any), in inventory order.
    pub fn select(&self, district: Option<&str>, level: Option<&str>, under: Option<SiteIdx>) -> Vec<SiteIdx> {
        (0..self.sites.len() as SiteIdx)
            .filter(|&s| {
                let site = self.site(s);
                district.is_none_or(|d| site.district == d)
                    && level.is_none_or(|l| site.level == l)
                    && under.is_none_or(|u| self.is_under(s, u))
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
    if row.level.is_empty() {
        return Err("field level: empty; name the site's level in the hierarchy (e.g. province, commune)".into());
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
    let exporter = match row.exporter.as_str() {
        "" => None,
        text => Some(text.parse::<IpAddr>().map_err(|e| format!("field exporter: {text:?} is not an IP address ({e})"))?),
    };
    if prefixes.is_empty() && exporter.is_none() {
        return Err("field prefix: empty and no exporter; a site needs a prefix or an exporter to match flows".into());
    }
    if row.exporter_ifindex.is_some() && exporter.is_none() {
        return Err("field exporter_ifindex: set without an exporter".into());
    }
    if row.uplink_ifindex.is_some() && (exporter.is_none() || row.exporter_ifindex.is_some()) {
        return Err("field uplink_ifindex: needs the site's own router in `exporter` (and no exporter_ifindex)".into());
    }
    Ok(Site {
        id: row.site_id,
        name: row.name,
        level: row.level,
        kind: row.kind,
        parent_id: row.parent_id,
        // Empty: inherited from the nearest ancestor once parents are known.
        district: row.district,
        admin_code: row.admin_code,
        link_mbps: row.link_mbps,
        prefixes,
        exporter,
        exporter_ifindex: row.exporter_ifindex,
        uplink_ifindex: row.uplink_ifindex,
        uplinks: parse_uplinks(&row.uplinks, exporter)?,
    })
}

/// The `uplinks` column: entries separated by `;`, each `interface@device` or `interface` (a
/// port of the site's own router, its `exporter`).
fn parse_uplinks(text: &str, exporter: Option<IpAddr>) -> Result<Vec<Uplink>, String> {
    let mut out: Vec<Uplink> = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (interface, device) = match entry.rsplit_once('@') {
            Some((i, d)) => (i.trim(), d.trim().to_string()),
            None => match exporter {
                Some(e) => (entry, e.to_string()),
                None => {
                    return Err(format!("field uplinks: {entry:?} names no device and the site has no exporter; write interface@device"));
                }
            },
        };
        if interface.is_empty() || device.is_empty() {
            return Err(format!("field uplinks: {entry:?} needs an interface and a device (interface@device)"));
        }
        let uplink = Uplink { device, interface: interface.to_string() };
        if out.contains(&uplink) {
            return Err(format!("field uplinks: {entry:?} is listed twice"));
        }
        out.push(uplink);
    }
    Ok(out)
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

    /// Levels come from the data: the Hà Giang three levels, the post-2025 two levels, any
    /// names; parents are checked.
    #[test]
    fn the_hierarchy_is_data() {
        let inv = Inventory::embedded();
        assert_eq!(inv.levels(), ["province", "district", "commune"]);
        let ubnd = inv.by_id("meo-vac.ubnd").unwrap();
        let pai_lung = inv.by_id("meo-vac.pai-lung").unwrap();
        assert_eq!(inv.parent(pai_lung), Some(ubnd));
        assert!(inv.is_under(pai_lung, ubnd) && !inv.is_under(ubnd, pai_lung));
        assert_eq!(inv.select(None, Some("commune"), Some(ubnd)), inv.select(Some("Mèo Vạc"), Some("commune"), None));

        // Two levels with other names, listed bottom first; districts inherited or "province".
        let csv = format!(
            "{HEADER}x1,Xã 1,xa,commune,t,,1,20,10.1.1.0/24,\nx2,Xã 2,xa,commune,t,,2,20,10.1.2.0/24,\nt,Tỉnh,tinh,office,,,0,100,10.1.0.0/24,\n"
        );
        let inv = Inventory::from_csv_str(&csv, "s.csv").unwrap();
        assert_eq!(inv.levels(), ["tinh", "xa"]);
        assert_eq!(inv.level_depth("xa"), Some(1));
        assert!(inv.sites().iter().all(|s| s.district == PROVINCE_DISTRICT_LABEL));
        assert_eq!(inv.parents_with_children(), vec![2]);
        // Four levels: a hamlet inherits its commune's district.
        let csv = format!(
            "{HEADER}p,P,province,o,,,0,100,10.1.0.0/24,\nd,D,district,o,p,Dist,0,50,10.1.1.0/24,\nc,C,commune,o,d,Dist,0,20,10.1.2.0/24,\nh,H,hamlet,o,c,,0,10,10.1.3.0/24,\n"
        );
        let inv = Inventory::from_csv_str(&csv, "s.csv").unwrap();
        assert_eq!(inv.levels(), ["province", "district", "commune", "hamlet"]);
        assert_eq!(inv.site(3).district, "Dist");
        assert_eq!(inv.ancestors(3).collect::<Vec<_>>(), vec![2, 1, 0]);

        let bad = |rows: &str| Inventory::from_csv_str(&format!("{HEADER}{rows}"), "s.csv").unwrap_err().to_string();
        let e = bad("a,A,commune,c,nowhere,,0,20,10.1.1.0/24,\n");
        assert!(e.contains("s.csv: line 2: field parent_id: \"nowhere\" is not a site of the inventory"), "{e}");
        let e = bad("a,A,commune,c,b,,0,20,10.1.1.0/24,\nb,B,district,c,a,,0,20,10.1.2.0/24,\n");
        assert!(e.contains("is its own ancestor (a cycle)"), "{e}");
        let e = bad("a,A,commune,c,,,0,20,10.1.1.0/24,\nb,B,commune,c,a,,0,20,10.1.2.0/24,\n");
        assert!(e.contains("line 3: field parent_id: parent \"a\" is at the same level (commune)"), "{e}");
        let e = bad("a,A,,c,,,0,20,10.1.1.0/24,\n");
        assert!(e.contains("field level: empty"), "{e}");
    }

    #[test]
    fn a_site_may_have_an_exporter_and_no_prefix() {
        let csv = "site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter,uplink_ifindex\n\
                   r1,R1,commune,commune,,D,1,20,,172.16.0.1,2\n\
                   r2,R2,commune,commune,,D,2,20,,2001:db8::1,\n";
        let inv = Inventory::from_csv_str(csv, "s.csv").unwrap();
        assert!(inv.site(0).prefixes.is_empty());
        assert_eq!(inv.site(0).uplink_ifindex, Some(2));
        assert_eq!(inv.site_of_exporter(addr_from_ip("2001:db8::1".parse().unwrap()), 0, 0), Some(ExporterMatch::Site(1)));
        // Neither prefix nor exporter: no flow could ever match it.
        let err = Inventory::from_csv_str(&format!("{HEADER}a,A,commune,commune,,D,1,20,,\n"), "s.csv").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("a prefix or an exporter"), "{err}");
        let err = Inventory::from_csv_str(
            "site_id,name,level,kind,link_mbps,prefix,exporter,exporter_ifindex,uplink_ifindex\na,A,commune,c,20,,172.16.0.1,3,2\n",
            "s.csv",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("uplink_ifindex"), "{err}");
    }

    #[test]
    fn uplinks_name_interfaces_of_the_sites_router_or_of_any_device() {
        let csv = "site_id,name,level,kind,link_mbps,prefix,exporter,uplinks\n\
                   a,A,commune,c,20,10.0.1.0/24,172.16.0.1,Gi0/0; Gi0/1@pe-1.tinh\n\
                   b,B,commune,c,20,10.0.2.0/24,,Gi0/2@pe-1.tinh\n\
                   c,C,commune,c,20,10.0.3.0/24,,\n";
        let inv = Inventory::from_csv_str(csv, "s.csv").unwrap();
        let up = |d: &str, i: &str| Uplink { device: d.into(), interface: i.into() };
        assert_eq!(inv.site(0).uplinks, vec![up("172.16.0.1", "Gi0/0"), up("pe-1.tinh", "Gi0/1")]);
        assert_eq!(inv.uplink_of("pe-1.tinh", "Gi0/2"), Some((1, 0)));
        assert_eq!(inv.uplink_of("172.16.0.1", "Gi0/0"), Some((0, 0)));
        assert_eq!(inv.uplink_of("172.16.0.1", "Gi0/9"), None);
        assert!(inv.site(2).uplinks.is_empty());
        let err = |row: &str| {
            Inventory::from_csv_str(&format!("site_id,name,level,kind,link_mbps,prefix,exporter,uplinks\n{row}"), "s.csv")
                .unwrap_err()
                .to_string()
        };
        assert!(err("b,B,commune,c,20,10.0.2.0/24,,Gi0/2").contains("line 2: field uplinks: \"Gi0/2\" names no device"));
        assert!(err("b,B,commune,c,20,10.0.2.0/24,,@pe-1").contains("needs an interface and a device"));
        let twice = err("a,A,commune,c,20,10.0.1.0/24,,Gi0/1@pe\nb,B,commune,c,20,10.0.2.0/24,,Gi0/1@pe");
        assert!(twice.contains("line 3: field uplinks: Gi0/1@pe is already an uplink of site \"a\""), "{twice}");
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
