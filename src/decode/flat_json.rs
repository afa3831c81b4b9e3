//! A fast path for the common shape of flow records: one flat JSON object whose values are
//! integers, strings without escapes, `true`, `false` or `null` — what goflow2 and pmacct print.
//!
//! Why: serde_json spends most of a goflow2 record on the dozen fields siteflow ignores, byte
//! by byte; this scanner steps over them with `memchr` and hands out the rest as borrowed
//! slices. It never decides that a record is bad: anything outside that shape (escapes, floats,
//! nesting, odd whitespace, trailing bytes) makes it give up, and the caller parses the record
//! with serde_json exactly as before, so both paths give the same answer (checked by a
//! differential property test and the fuzz targets).

/// A value of a flat object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scalar<'a> {
    /// A string without escapes.
    Str(&'a str),
    /// An integer, as serde_json would read it (a `u64` or a negative `i64`).
    Int(i128),
    /// `true`, `false` or `null`.
    Literal,
}

/// Scans `rec`, calling `field(key, value)` for each member in order. Returns `None` as soon as
/// the record leaves the supported shape or `field` returns `None` (the caller's "I cannot take
/// this value here"); `Some(())` when the whole input was one such object. (The decoders use
/// [`scan_keyed`]; this plain form lists a record's members for tests.)
#[cfg(test)]
pub(crate) fn scan<'a>(rec: &'a str, mut field: impl FnMut(&'a str, Scalar<'a>) -> Option<()>) -> Option<()> {
    let b = rec.as_bytes();
    let mut i = open_object(b)?;
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(());
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let (key, next) = string(rec, i + 1)?;
        i = colon(b, next)?;
        let (value, next) = scalar(rec, i)?;
        field(key, value)?;
        i = match member_end(b, next)? {
            Some(i) => i,
            None => return Some(()),
        };
    }
}

/// The keys a caller of [`scan_keyed`] knows, in the order its records usually list them, each
/// with the slot its value goes to, or `None` for a key whose value it does not want.
pub(crate) type Keys = [(&'static str, Option<u8>)];

/// [`scan`] for records whose keys usually come in one order (an exporter prints its fields in
/// the same order every time), calling `field(slot, value)` for the wanted keys of `keys`.
///
/// Why: a member whose key is the one expected next is recognised by comparing its bytes, with
/// no search for its closing quote and no match against every name; the value of a key not
/// wanted, or not in `keys`, is stepped over without being read (an array of scalars too, which
/// collectors print for AS paths and communities). The shape accepted is the same as `scan`'s
/// (plus such arrays), and anything else gives `None` for serde_json to judge.
pub(crate) fn scan_keyed<'a>(rec: &'a str, keys: &Keys, mut field: impl FnMut(u8, Scalar<'a>) -> Option<()>) -> Option<()> {
    let b = rec.as_bytes();
    let mut i = open_object(b)?;
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(());
    }
    let mut expected = 0;
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        // Usually the key expected next, or one further on where the record lacks a field.
        let (slot, next) = match keys[expected..].iter().position(|&(name, _)| key_at(b, i + 1, name)) {
            Some(k) => {
                let k = expected + k;
                expected = k + 1;
                (keys[k].1, i + 1 + keys[k].0.len() + 1)
            }
            None => {
                let (key, next) = string(rec, i + 1)?;
                match keys.iter().position(|(name, _)| *name == key) {
                    Some(k) => {
                        expected = k + 1;
                        (keys[k].1, next)
                    }
                    None => (None, next),
                }
            }
        };
        i = colon(b, next)?;
        let next = match slot {
            Some(slot) => {
                let (value, next) = scalar(rec, i)?;
                field(slot, value)?;
                next
            }
            None => skip_value(b, i)?,
        };
        i = match member_end(b, next)? {
            Some(i) => i,
            None => return Some(()),
        };
    }
}

/// The index after the `{` that opens the record (and any whitespace after it).
fn open_object(b: &[u8]) -> Option<usize> {
    // A control character is only valid JSON as whitespace between tokens; rather than tell
    // where it stands, leave any record that has one to serde_json. (Written as a fold so that
    // it compiles to a vector loop over the whole record.)
    if b.iter().fold(false, |any, &c| any | (c < 0x20)) {
        return None;
    }
    let i = skip_ws(b, 0);
    (b.get(i) == Some(&b'{')).then(|| skip_ws(b, i + 1))
}

/// Whether the key starting at `at` (after its opening quote) is exactly `name`.
#[inline]
fn key_at(b: &[u8], at: usize, name: &str) -> bool {
    let name = name.as_bytes();
    b.get(at + name.len()) == Some(&b'"') && same_bytes(&b[at..at + name.len()], name)
}

/// `a == b` for short slices of equal length, eight bytes at a time and inline (keys are short).
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let (mut a, mut b) = (a, b);
    while a.len() >= 8 {
        if a[..8] != b[..8] {
            return false;
        }
        (a, b) = (&a[8..], &b[8..]);
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// The index after the `:` that follows a key ending before `i` (and any whitespace after it).
fn colon(b: &[u8], i: usize) -> Option<usize> {
    let i = skip_ws(b, i);
    (b.get(i) == Some(&b':')).then(|| skip_ws(b, i + 1))
}

/// The scalar value at `i` and the index after it.
fn scalar(rec: &str, i: usize) -> Option<(Scalar<'_>, usize)> {
    let b = rec.as_bytes();
    Some(match *b.get(i)? {
        b'"' => {
            let (s, next) = string(rec, i + 1)?;
            (Scalar::Str(s), next)
        }
        b'-' | b'0'..=b'9' => integer(b, i)?,
        b't' => (Scalar::Literal, literal(b, i, b"true")?),
        b'f' => (Scalar::Literal, literal(b, i, b"false")?),
        b'n' => (Scalar::Literal, literal(b, i, b"null")?),
        _ => return None,
    })
}

/// Steps over the value at `i` as [`scalar`] would read it, or an array of such values; the
/// index after it.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => {
            let end = quote_or_backslash(b, i + 1)?;
            (b[end] == b'"').then_some(end + 1)
        }
        b'[' => {
            let mut i = skip_ws(b, i + 1);
            if b.get(i) == Some(&b']') {
                return Some(i + 1);
            }
            loop {
                if b.get(i) == Some(&b'[') {
                    return None;
                }
                i = skip_ws(b, skip_value(b, i)?);
                match b.get(i) {
                    Some(b',') => i = skip_ws(b, i + 1),
                    Some(b']') => return Some(i + 1),
                    _ => return None,
                }
            }
        }
        b'-' | b'0'..=b'9' => integer(b, i).map(|(_, next)| next),
        b't' => literal(b, i, b"true"),
        b'f' => literal(b, i, b"false"),
        b'n' => literal(b, i, b"null"),
        _ => None,
    }
}

/// After a member's value ending before `i`: `Some(Some(index of the next key))` after a
/// comma, `Some(None)` where the object (and the record) ends, `None` otherwise.
fn member_end(b: &[u8], i: usize) -> Option<Option<usize>> {
    let i = skip_ws(b, i);
    match b.get(i) {
        Some(b',') => Some(Some(skip_ws(b, i + 1))),
        Some(b'}') => (skip_ws(b, i + 1) == b.len()).then_some(None),
        _ => None,
    }
}

/// Steps over spaces. The other whitespace bytes are control characters, and [`open_object`]
/// leaves a record that has one to serde_json.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    i
}

/// The string whose first byte is at `start` (just after its opening quote) and the index after
/// its closing quote; `None` if it has an escape (serde_json's business).
fn string(rec: &str, start: usize) -> Option<(&str, usize)> {
    let b = rec.as_bytes();
    let end = quote_or_backslash(b, start)?;
    if b[end] == b'\\' {
        return None;
    }
    // Quotes are ASCII, so both ends are character boundaries of the (valid UTF-8) record.
    Some((&rec[start..end], end + 1))
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// The high bit of each byte of `w` that equals `c` (exact for the lowest such byte, which is
/// all [`quote_or_backslash`] reads: a borrow can only mark bytes above a match).
fn bytes_equal(w: u64, c: u8) -> u64 {
    let x = w ^ (ONES * u64::from(c));
    x.wrapping_sub(ONES) & !x & (ONES << 7)
}

/// The first `"` or `\\` at or after `i`, eight bytes at a time: the strings of flow records are
/// short, and a byte loop pays a mispredicted branch at the end of each (a quarter of the time
/// of a record before this).
fn quote_or_backslash(b: &[u8], mut i: usize) -> Option<usize> {
    while let Some(chunk) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let found = bytes_equal(w, b'"') | bytes_equal(w, b'\\');
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b[i..].iter().position(|&c| c == b'"' || c == b'\\').map(|p| i + p)
}

/// A JSON integer at `i`: optional minus, no leading zero, within `i64::MIN..=u64::MAX` and not
/// `-0`, and not the start of a fraction or exponent (those are left to serde_json).
fn integer(b: &[u8], mut i: usize) -> Option<(Scalar<'static>, usize)> {
    let negative = b[i] == b'-';
    if negative {
        i += 1;
    }
    let start = i;
    let mut v: u64 = 0;
    while let Some(&d @ b'0'..=b'9') = b.get(i) {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        i += 1;
    }
    let digits = i - start;
    if digits == 0 || (digits > 1 && b[start] == b'0') || matches!(b.get(i), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    // serde_json reads only these as integers (`-0` and anything wider become floats).
    let v = i128::from(v);
    let v = if negative { -v } else { v };
    let integral = !negative || (v < 0 && v >= i128::from(i64::MIN));
    integral.then_some((Scalar::Int(v), i))
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b[i..].starts_with(word).then_some(i + word.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(s: &str) -> Option<Vec<(&str, Scalar<'_>)>> {
        let mut out = Vec::new();
        scan(s, |k, v| {
            out.push((k, v));
            Some(())
        })
        .map(|()| out)
    }

    #[test]
    fn flat_objects_are_scanned() {
        let m = members(r#" { "a" : 1 , "b":"x y","c":-20,"d":true,"e":null,"f":0 } "#).unwrap();
        assert_eq!(
            m,
            vec![
                ("a", Scalar::Int(1)),
                ("b", Scalar::Str("x y")),
                ("c", Scalar::Int(-20)),
                ("d", Scalar::Literal),
                ("e", Scalar::Literal),
                ("f", Scalar::Int(0))
            ]
        );
        assert_eq!(members("{}"), Some(vec![]));
        assert_eq!(members(r#"{"ü":"ñ"}"#), Some(vec![("ü", Scalar::Str("ñ"))]));
    }

    #[test]
    fn the_first_quote_or_backslash_is_found_at_any_offset() {
        for len in 0..40 {
            for at in 0..len {
                for c in [b'"', b'\\'] {
                    let mut b = vec![b'a'; len];
                    b[at] = c;
                    // A second match further on, and a byte that borrows (0x00 is not in a record,
                    // but 0x01..0x21 and '"'+1 are the neighbours a borrow could confuse).
                    if at + 1 < len {
                        b[at + 1] = b'#';
                    }
                    if at + 3 < len {
                        b[at + 3] = b'"';
                    }
                    assert_eq!(quote_or_backslash(&b, 0), Some(at), "len {len} at {at}");
                }
            }
            assert_eq!(quote_or_backslash(&vec![b'!'; len], 0), None);
        }
    }

    #[test]
    fn keyed_scan_reads_wanted_keys_in_any_order_and_steps_over_the_rest() {
        const KEYS: &Keys = &[("a", Some(0)), ("skip", None), ("b", Some(1))];
        fn read(s: &str) -> Option<Vec<(u8, Scalar<'_>)>> {
            let mut out = Vec::new();
            scan_keyed(s, KEYS, |slot, v| {
                out.push((slot, v));
                Some(())
            })
            .map(|()| out)
        }
        let want = Some(vec![(0, Scalar::Int(1)), (1, Scalar::Str("x"))]);
        assert_eq!(read(r#"{"a":1,"skip":[1,"y",null],"b":"x"}"#), want);
        assert_eq!(
            read(r#"{"b":"x","other":[],"a":1}"#).map(|mut v| {
                v.sort_by_key(|(s, _)| *s);
                v
            }),
            want
        );
        assert_eq!(read(r#"{ "ab" : 2 , "a" : 1 , "b" : "x" }"#), want);
        for s in [r#"{"a":1,"skip":[[1]]}"#, r#"{"a":1,"skip":[1,]}"#, r#"{"a":1,"skip":1.5}"#, r#"{"a":1,"skip":"\n"}"#, r#"{"a":[1]}"#] {
            assert_eq!(read(s), None, "{s}");
        }
    }

    #[test]
    fn anything_else_is_left_to_serde_json() {
        for s in [
            r#"{"a":"x\"y"}"#,
            r#"{"a":1.5}"#,
            r#"{"a":1e3}"#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
            r#"{"a":[1]}"#,
            r#"{"a":{"b":1}}"#,
            r#"{"a":1}x"#,
            r#"{"a":1,}"#,
            r#"{"a":1"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":tru}"#,
            "{\"a\":\"\u{1}\"}",
            "[1]",
            "",
            r#"{"a":123456789012345678901234567890123456789}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":-9223372036854775809}"#,
            r#"{"a":-0}"#,
        ] {
            assert_eq!(members(s), None, "{s}");
        }
    }
}
