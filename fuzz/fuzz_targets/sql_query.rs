//! Fuzzes the SQL engine: bytes become a query (`siteflow::sql::fuzz::sql_from_bytes`: random
//! expressions, operator chains, nesting, set operations, functions with extreme arguments; a
//! leading `!` sends the rest as SQL text) that must get an answer or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| siteflow::sql::fuzz::check(&siteflow::sql::fuzz::sql_from_bytes(data)));
