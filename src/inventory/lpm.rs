//! Longest-prefix match of IPv4 and IPv6 addresses.
//!
//! One hash map per distinct prefix length, probed from the longest length down. An inventory
//! has a handful of distinct lengths (the Hà Giang plan uses only /24), so a lookup is one or two
//! hash probes — cheaper than walking a trie, and obviously correct.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Addresses travel through the pipeline as 128-bit integers: IPv6 as is, IPv4 as IPv4-mapped
/// IPv6 (`::ffff:a.b.c.d`), so one column type holds both.
pub type Addr = u128;

const V4_MAPPED_PREFIX: u128 = 0xffff_u128 << 32;

/// Converts an address to its 128-bit form (IPv4 becomes IPv4-mapped IPv6).
pub fn addr_from_ip(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => V4_MAPPED_PREFIX | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Converts a 128-bit address back to an `IpAddr` (IPv4-mapped becomes IPv4).
pub fn ip_from_addr(addr: Addr) -> IpAddr {
    match as_v4(addr) {
        Some(v4) => IpAddr::V4(v4.into()),
        None => IpAddr::V6(addr.into()),
    }
}

fn as_v4(addr: Addr) -> Option<u32> {
    (addr >> 32 == 0xffff).then_some(addr as u32)
}

/// A prefix already present in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicatePrefix(pub IpNet);

/// Maps prefixes to values; `lookup` returns the value of the longest prefix containing an address.
#[derive(Debug, Clone)]
pub struct PrefixTable<V> {
    /// (prefix length, network → value), longest length first.
    v4: Vec<(u8, HashMap<u32, V>)>,
    v6: Vec<(u8, HashMap<u128, V>)>,
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        Self { v4: Vec::new(), v6: Vec::new() }
    }
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    if len == 0 { 0 } else { addr & (u32::MAX << (32 - u32::from(len))) }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 { 0 } else { addr & (u128::MAX << (128 - u32::from(len))) }
}

fn level<K, V>(levels: &mut Vec<(u8, HashMap<K, V>)>, len: u8) -> &mut HashMap<K, V> {
    let pos = match levels.iter().position(|(l, _)| *l <= len) {
        Some(pos) if levels[pos].0 == len => pos,
        Some(pos) => {
            levels.insert(pos, (len, HashMap::new()));
            pos
        }
        None => {
            levels.push((len, HashMap::new()));
            levels.len() - 1
        }
    };
    &mut levels[pos].1
}

impl<V> PrefixTable<V> {
    /// Adds a prefix. Host bits are ignored (`10.1.1.7/24` is `10.1.1.0/24`). A prefix already
    /// present keeps its value.
    pub fn insert(&mut self, net: IpNet, value: V) -> Result<(), DuplicatePrefix> {
        use std::collections::hash_map::Entry;
        let len = net.prefix_len();
        let vacant = match net {
            IpNet::V4(n) => match level(&mut self.v4, len).entry(mask_v4(u32::from(n.addr()), len)) {
                Entry::Vacant(e) => {
                    e.insert(value);
                    true
                }
                Entry::Occupied(_) => false,
            },
            IpNet::V6(n) => match level(&mut self.v6, len).entry(mask_v6(u128::from(n.addr()), len)) {
                Entry::Vacant(e) => {
                    e.insert(value);
                    true
                }
                Entry::Occupied(_) => false,
            },
        };
        if vacant { Ok(()) } else { Err(DuplicatePrefix(net.trunc())) }
    }

    /// The value of the longest prefix containing `addr`, if any.
    #[inline]
    pub fn lookup(&self, addr: Addr) -> Option<&V> {
        match as_v4(addr) {
            Some(v4) => self.v4.iter().find_map(|(len, map)| map.get(&mask_v4(v4, *len))),
            None => self.v6.iter().find_map(|(len, map)| map.get(&mask_v6(addr, *len))),
        }
    }

    /// The value of the longest prefix containing `ip`, if any.
    pub fn lookup_ip(&self, ip: IpAddr) -> Option<&V> {
        self.lookup(addr_from_ip(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(prefixes: &[(&str, u32)]) -> PrefixTable<u32> {
        let mut t = PrefixTable::default();
        for (p, v) in prefixes {
            t.insert(p.parse().unwrap(), *v).unwrap();
        }
        t
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.1.0/24", 3), ("0.0.0.0/0", 0)]);
        let at = |s: &str| t.lookup_ip(s.parse().unwrap()).copied();
        assert_eq!(at("10.1.1.9"), Some(3));
        assert_eq!(at("10.1.2.9"), Some(2));
        assert_eq!(at("10.9.9.9"), Some(1));
        assert_eq!(at("192.0.2.1"), Some(0));
    }

    #[test]
    fn ipv6_and_ipv4_are_separate() {
        let t = table(&[("2001:db8:1::/48", 6), ("2001:db8::/32", 5), ("10.0.0.0/8", 4)]);
        let at = |s: &str| t.lookup_ip(s.parse().unwrap()).copied();
        assert_eq!(at("2001:db8:1::77"), Some(6));
        assert_eq!(at("2001:db8:2::77"), Some(5));
        assert_eq!(at("2001:db9::1"), None);
        assert_eq!(at("10.2.3.4"), Some(4));
        // An IPv6 address whose low bits look like 10.x must not match the IPv4 table.
        assert_eq!(at("::a02:304"), None);
    }

    #[test]
    fn duplicate_is_reported_with_host_bits_cleared() {
        let mut t = table(&[("10.1.1.0/24", 1)]);
        assert_eq!(t.insert("10.1.1.5/24".parse().unwrap(), 2), Err(DuplicatePrefix("10.1.1.0/24".parse().unwrap())));
    }

    #[test]
    fn address_round_trip() {
        for s in ["10.1.2.3", "::1", "2001:db8::5", "0.0.0.0"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_from_addr(addr_from_ip(ip)), ip);
        }
    }

    fn naive(prefixes: &[(IpNet, u32)], ip: IpAddr) -> Option<u32> {
        prefixes.iter().filter(|(n, _)| n.contains(&ip)).max_by_key(|(n, _)| n.prefix_len()).map(|(_, v)| *v)
    }

    proptest! {
        /// The table agrees with a linear scan for the longest containing prefix.
        #[test]
        fn agrees_with_linear_scan(
            nets in proptest::collection::vec((any::<u32>(), 0u8..=32), 1..40),
            nets6 in proptest::collection::vec((any::<u128>(), 0u8..=128), 1..20),
            probes in proptest::collection::vec(any::<u32>(), 1..50),
            probes6 in proptest::collection::vec(any::<u128>(), 1..20),
        ) {
            let mut table = PrefixTable::default();
            let mut list = Vec::new();
            for (i, (a, len)) in nets.iter().enumerate() {
                let net = IpNet::new(IpAddr::V4((*a).into()), *len).unwrap().trunc();
                if table.insert(net, i as u32).is_ok() { list.push((net, i as u32)); }
            }
            for (i, (a, len)) in nets6.iter().enumerate() {
                let net = IpNet::new(IpAddr::V6((*a).into()), *len).unwrap().trunc();
                // Skip v6 nets that are really IPv4-mapped space: they are looked up as IPv4.
                if (a >> 32) == 0xffff { continue; }
                if table.insert(net, 1000 + i as u32).is_ok() { list.push((net, 1000 + i as u32)); }
            }
            // Probe inside the prefixes too, not only at random.
            let inside: Vec<u32> = nets.iter().map(|(a, _)| *a).collect();
            for p in probes.iter().chain(inside.iter()) {
                let ip = IpAddr::V4((*p).into());
                prop_assert_eq!(table.lookup_ip(ip).copied(), naive(&list, ip));
            }
            for p in probes6.iter().chain(nets6.iter().map(|(a, _)| a)) {
                if (p >> 32) == 0xffff { continue; }
                let ip = IpAddr::V6((*p).into());
                prop_assert_eq!(table.lookup_ip(ip).copied(), naive(&list, ip));
            }
        }
    }
}
