//! Fuzzes the pmacct_sflow_counters_json decoder: any bytes, as one message or split into several at 0xFF bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use siteflow::types::Format;

fuzz_target!(|data: &[u8]| siteflow::decode::fuzz::check(Format::PmacctSflowCountersJson, data));
