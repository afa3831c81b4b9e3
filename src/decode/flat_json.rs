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
/// this value here"); `Some(())` when the whole input was one such object.
pub(crate) fn scan<'a>(rec: &'a str, mut field: impl FnMut(&'a str, Scalar<'a>) -> Option<()>) -> Option<()> {
    let b = rec.as_bytes();
    // A control character is only valid JSON as whitespace between tokens; rather than tell
    // where it stands, leave any record that has one to serde_json. (Written as a fold so that
    // it compiles to a vector loop over the whole record.)
    if b.iter().fold(false, |any, &c| any | (c < 0x20)) {
        return None;
    }
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(());
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let (key, next) = string(rec, i + 1)?;
        i = skip_ws(b, next);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let (value, next) = match *b.get(i)? {
            b'"' => {
                let (s, next) = string(rec, i + 1)?;
                (Scalar::Str(s), next)
            }
            b'-' | b'0'..=b'9' => integer(b, i)?,
            b't' => (Scalar::Literal, literal(b, i, b"true")?),
            b'f' => (Scalar::Literal, literal(b, i, b"false")?),
            b'n' => (Scalar::Literal, literal(b, i, b"null")?),
            _ => return None,
        };
        field(key, value)?;
        i = skip_ws(b, next);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return (skip_ws(b, i + 1) == b.len()).then_some(()),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
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
