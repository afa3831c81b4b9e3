//! The invariants every decoder keeps on any input, shared by the fuzz targets (`fuzz/`) and
//! the property tests: no panic, every record decoded, rejected with a reason or counted as no traffic, one output row
//! per decoded record, and every rejection pointing at bytes of a real message.

use super::{DecodeLimits, decode};
use crate::types::{Format, Messages};

/// Decodes `data` as `format` (one message, or several split at `0xFF` bytes) and panics if an
/// invariant does not hold.
pub fn check(format: Format, data: &[u8]) {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xff).collect();
    let mut msgs = Messages::default();
    for part in &parts {
        msgs.push(part);
    }
    let limits = DecodeLimits {
        max_message_bytes: 64 * 1024,
        max_bytes_per_record: 1 << 40,
        min_time_ns: DecodeLimits::MIN_TIME_NS,
        max_time_ns: 4_102_444_800_000_000_000,
    };
    let (decoded, stats) = decode(format, &msgs, &limits);
    assert_eq!(decoded.num_rows() as u64, stats.decoded, "{}: rows != decoded records", format.as_str());
    assert_eq!(
        stats.decoded + stats.rejected_total() + stats.no_traffic,
        stats.records,
        "{}: a record neither decoded, rejected nor counted as no traffic",
        format.as_str()
    );
    assert_eq!(stats.bad.len() as u64, stats.rejected_total(), "{}: a rejection without its location", format.as_str());
    for bad in &stats.bad {
        assert!(
            bad.message < parts.len() && bad.range.end <= parts[bad.message].len(),
            "{}: rejection outside its message",
            format.as_str()
        );
    }
}
