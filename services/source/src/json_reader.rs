//! A strict, zero-copy JSON reader for SDK uploads.
//!
//! Why not a general JSON library: the rules of SPEC section 2 are defined by
//! what a JSON document *is* (RFC 8259, as Python's `json` reads it), and they
//! turn on distinctions general libraries blur or reject:
//!
//! - an *integer* is a number without fraction or exponent that fits in 64
//!   signed bits; `5.0`, `1e3`, `2**63` are numbers but not integers, and
//!   `1e999` is still a valid number (not a parse error);
//! - a repeated key is legal and the last one wins;
//! - only the few fields the job reads are materialised; everything else
//!   (labels, params, pages) is validated and skipped without allocating.
//!
//! Strings borrow from the input unless they contain escapes. A lone UTF-16
//! surrogate escape (`"\ud800"`), which Python keeps in its `str`, becomes
//! U+FFFD here: Rust strings cannot hold it (a known divergence from the
//! oracle, for input no SDK sends). Two limits of the oracle's CPython 3.11
//! are reproduced, measured with `oracle.py` itself: containers nested more
//! than [`MAX_DEPTH`] deep (its recursion limit) and integer literals of more
//! than [`MAX_INT_DIGITS`] digits (its int conversion limit) make the
//! document malformed.

use std::borrow::Cow;

/// Containers nested deeper than this make the document malformed: the
/// upload object is depth 1, and `oracle.py` accepts 992 arrays nested in it.
pub const MAX_DEPTH: usize = 993;

/// Integer literals with more digits than this make the document malformed
/// (CPython's default `sys.get_int_max_str_digits()`).
pub const MAX_INT_DIGITS: usize = 4300;

/// The document is not JSON (or nests too deep); the upload is `malformed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

type Result<T> = std::result::Result<T, NotJson>;

/// A JSON value as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scalar<'a> {
    /// The key was not present.
    #[default]
    Absent,
    /// An integer in the SPEC sense.
    Int(i64),
    /// A string.
    Str(Cow<'a, str>),
    /// Anything else: null, a boolean, a non-integer number, an array, an object.
    Other,
}

impl<'a> Scalar<'a> {
    /// The integer, if this is one.
    pub fn int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The string if it is a non-empty one.
    pub fn non_empty_str(&self) -> Option<&str> {
        self.str().filter(|s| !s.is_empty())
    }
}

/// A cursor over one JSON document.
pub struct Reader<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `s`.
    pub fn new(s: &'a str) -> Self {
        Self { s, b: s.as_bytes(), pos: 0 }
    }

    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.pos) {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(NotJson)
        }
    }

    /// After the top-level value: only whitespace may follow.
    pub fn end(&mut self) -> Result<()> {
        if self.peek().is_none() { Ok(()) } else { Err(NotJson) }
    }

    /// Whether the next value is an object (without consuming it).
    pub fn at_object(&mut self) -> bool {
        self.peek() == Some(b'{')
    }

    /// Whether the next value is an array (without consuming it).
    pub fn at_array(&mut self) -> bool {
        self.peek() == Some(b'[')
    }

    /// Read an object, calling `member(reader, key)` for each member; the
    /// callback must consume the member's value (e.g. with [`Self::scalar`]).
    pub fn object(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Result<()>,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(NotJson);
        }
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(NotJson);
            }
            let key = self.string()?;
            self.expect(b':')?;
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(NotJson),
            }
        }
    }

    /// Read an array, calling `item(reader)` for each element, which must
    /// consume it.
    pub fn array(&mut self, depth: usize, mut item: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(NotJson);
        }
        self.expect(b'[')?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(NotJson),
            }
        }
    }

    /// Read any value as a [`Scalar`]; containers are validated and skipped.
    /// `depth` is the nesting depth of the value itself.
    pub fn scalar(&mut self, depth: usize) -> Result<Scalar<'a>> {
        match self.peek().ok_or(NotJson)? {
            b'"' => self.string().map(Scalar::Str),
            b'{' => self.object(depth, |r, _| r.skip(depth + 1)).map(|()| Scalar::Other),
            b'[' => self.array(depth, |r| r.skip(depth + 1)).map(|()| Scalar::Other),
            b't' => self.literal(b"true").map(|()| Scalar::Other),
            b'f' => self.literal(b"false").map(|()| Scalar::Other),
            b'n' => self.literal(b"null").map(|()| Scalar::Other),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(NotJson),
        }
    }

    /// Validate and skip any value.
    pub fn skip(&mut self, depth: usize) -> Result<()> {
        self.scalar(depth).map(drop)
    }

    fn literal(&mut self, word: &[u8]) -> Result<()> {
        if self.b[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(NotJson)
        }
    }

    /// RFC 8259 number; an integer in the SPEC sense when it has neither
    /// fraction nor exponent and fits in i64.
    fn number(&mut self) -> Result<Scalar<'a>> {
        let start = self.pos;
        let b = self.b;
        let mut i = self.pos;
        let negative = b.get(i) == Some(&b'-');
        if negative {
            i += 1;
        }
        // The magnitude, accumulated negatively so that i64::MIN fits; None
        // once it no longer fits in i64.
        let mut value: Option<i64> = Some(0);
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while let Some(&d @ b'0'..=b'9') = b.get(i) {
                    value = value.and_then(|v| v.checked_mul(10)).and_then(|v| v.checked_sub(i64::from(d - b'0')));
                    i += 1;
                }
            }
            _ => return Err(NotJson),
        }
        let int_end = i;
        let digits = int_end - start - usize::from(negative);
        if b.get(i) == Some(&b'.') {
            i += 1;
            let digits = i;
            while matches!(b.get(i), Some(b'0'..=b'9')) {
                i += 1;
            }
            if i == digits {
                return Err(NotJson);
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let digits = i;
            while matches!(b.get(i), Some(b'0'..=b'9')) {
                i += 1;
            }
            if i == digits {
                return Err(NotJson);
            }
        }
        self.pos = i;
        if i != int_end {
            return Ok(Scalar::Other);
        }
        if digits > MAX_INT_DIGITS {
            return Err(NotJson);
        }
        let value = if negative { value } else { value.and_then(i64::checked_neg) };
        Ok(value.map_or(Scalar::Other, Scalar::Int))
    }

    /// A string literal; borrowed unless it has escapes.
    fn string(&mut self) -> Result<Cow<'a, str>> {
        self.pos += 1; // the opening quote, checked by the caller
        let start = self.pos;
        let b = self.b;
        // Most strings are short and have no escape: one tight scan to the
        // closing quote, a backslash, or a raw control character (an error).
        // (memchr2 costs more than it saves on strings this short: measured.)
        let Some(offset) = b[start..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20) else {
            return Err(NotJson);
        };
        let mut i = start + offset;
        if b[i] < 0x20 {
            return Err(NotJson);
        }
        if b[i] == b'"' {
            self.pos = i + 1;
            return Ok(Cow::Borrowed(&self.s[start..i]));
        }
        let mut out = String::with_capacity(i - start + 16);
        out.push_str(&self.s[start..i]);
        let mut run = i;
        loop {
            match b.get(i) {
                Some(b'"') => {
                    out.push_str(&self.s[run..i]);
                    self.pos = i + 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    out.push_str(&self.s[run..i]);
                    i += 1;
                    match b.get(i) {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let unit = self.hex4(i + 1)?;
                            i += 4;
                            out.push(self.utf16(unit, &mut i));
                        }
                        _ => return Err(NotJson),
                    }
                    i += 1;
                    run = i;
                }
                Some(&c) if c < 0x20 => return Err(NotJson),
                Some(_) => i += 1,
                None => return Err(NotJson),
            }
        }
    }

    fn hex4(&self, at: usize) -> Result<u32> {
        let digits = self.b.get(at..at + 4).ok_or(NotJson)?;
        digits.iter().try_fold(0u32, |acc, &d| {
            let v = (d as char).to_digit(16).ok_or(NotJson)?;
            Ok(acc * 16 + v)
        })
    }

    /// The char of a `\uXXXX` escape whose last hex digit is at `*i`,
    /// combining a surrogate pair when a low surrogate escape follows.
    fn utf16(&self, unit: u32, i: &mut usize) -> char {
        if (0xD800..0xDC00).contains(&unit)
            && self.b.get(*i + 1..*i + 3) == Some(b"\\u")
            && let Ok(low @ 0xDC00..=0xDFFF) = self.hex4(*i + 3)
        {
            *i += 6;
            let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
            return char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
        }
        char::from_u32(unit).unwrap_or(char::REPLACEMENT_CHARACTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(s: &str) -> std::result::Result<Scalar<'_>, NotJson> {
        let mut r = Reader::new(s);
        let v = r.scalar(1)?;
        r.end()?;
        Ok(v)
    }

    #[test]
    fn integers_are_exactly_the_spec_ones() {
        assert_eq!(scalar("5"), Ok(Scalar::Int(5)));
        assert_eq!(scalar("-0"), Ok(Scalar::Int(0)));
        assert_eq!(scalar("9223372036854775807"), Ok(Scalar::Int(i64::MAX)));
        assert_eq!(scalar("-9223372036854775808"), Ok(Scalar::Int(i64::MIN)));
        for not_int in ["5.0", "1e3", "1E+2", "9223372036854775808", "1e999", "-1.5e-7", "true", "null"] {
            assert_eq!(scalar(not_int), Ok(Scalar::Other), "{not_int}");
        }
        for not_json in ["01", "-", "1.", ".5", "1e", "+1", "NaN", "Infinity", "-Infinity", "tru", "0x10"] {
            assert_eq!(scalar(not_json), Err(NotJson), "{not_json}");
        }
        let (ok, too_long) = ("9".repeat(MAX_INT_DIGITS), "9".repeat(MAX_INT_DIGITS + 1));
        assert_eq!(scalar(&ok), Ok(Scalar::Other));
        assert_eq!(scalar(&format!("-{ok}")), Ok(Scalar::Other));
        assert_eq!(scalar(&too_long), Err(NotJson), "as CPython's int conversion limit");
        assert_eq!(scalar(&format!("1.{too_long}")), Ok(Scalar::Other), "floats have no digit limit");
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        assert!(matches!(scalar(r#""plain""#), Ok(Scalar::Str(Cow::Borrowed("plain")))));
        assert_eq!(scalar(r#""a\"b\\c\/\n\u0041\u00e9""#), Ok(Scalar::Str("a\"b\\c/\nAé".into())));
        assert_eq!(scalar(r#""\ud83d\ude00""#), Ok(Scalar::Str("😀".into())));
        assert_eq!(scalar(r#""\ud800x""#), Ok(Scalar::Str("\u{fffd}x".into())));
        assert_eq!(scalar("\"tab\there\""), Err(NotJson), "raw control characters are not JSON");
        assert_eq!(scalar(r#""\x""#), Err(NotJson));
        assert_eq!(scalar(r#""open"#), Err(NotJson));
        assert_eq!(scalar(r#""\u12""#), Err(NotJson));
    }

    #[test]
    fn containers_are_validated_while_skipped() {
        assert_eq!(scalar(r#"{"a":[1,{"b":null}],"c":"d"}"#), Ok(Scalar::Other));
        assert_eq!(scalar(" [ ] "), Ok(Scalar::Other));
        for bad in ["[1,]", "{\"a\":1,}", "{\"a\" 1}", "{1:2}", "[1 2]", "{\"a\":1", "[", "{} {}"] {
            assert_eq!(scalar(bad), Err(NotJson), "{bad}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert_eq!(scalar(&ok), Ok(Scalar::Other));
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(scalar(&deep), Err(NotJson));
    }
}
