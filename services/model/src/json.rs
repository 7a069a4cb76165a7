//! JSON output byte-compatible with Python's
//! `json.dumps(obj, sort_keys=True, separators=(',', ':'))`, the format of
//! `oracle.py`: non-ASCII escaped as `\uXXXX` (lower-case hex, surrogate pairs
//! beyond the BMP), so an export can be compared to the oracle with `diff`.
//! Callers write keys in sorted order; [`JsonObject`] only lays them out.

use std::fmt::{Display, Write};

/// Append `s` as a JSON string literal, escaped as Python's `ensure_ascii` does.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Writes one JSON object, `{"k":v,...}`, key by key.
pub struct JsonObject<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> JsonObject<'a> {
    /// Start an object at the end of `out`.
    pub fn new(out: &'a mut String) -> Self {
        out.push('{');
        Self { out, first: true }
    }

    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        write_str(self.out, k);
        self.out.push(':');
    }

    /// A string member.
    pub fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        write_str(self.out, v);
    }

    /// A string member from a `Display` value (which must need no escaping).
    pub fn display(&mut self, k: &str, v: &impl Display) {
        self.key(k);
        let _ = write!(self.out, "\"{v}\"");
    }

    /// An unsigned integer member.
    pub fn uint(&mut self, k: &str, v: u64) {
        self.key(k);
        let _ = write!(self.out, "{v}");
    }

    /// A signed integer member (wide: sums may pass 64 bits).
    pub fn int(&mut self, k: &str, v: i128) {
        self.key(k);
        let _ = write!(self.out, "{v}");
    }

    /// An array of unsigned integers.
    pub fn uints(&mut self, k: &str, vs: &[u64]) {
        self.key(k);
        self.out.push('[');
        for (i, v) in vs.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{v}");
        }
        self.out.push(']');
    }

    /// An object of string keys (given in sorted order) to integers.
    pub fn map<'s>(&mut self, k: &str, entries: impl Iterator<Item = (&'s str, i128)>) {
        self.key(k);
        let mut inner = JsonObject::new(self.out);
        for (key, v) in entries {
            inner.int(key, v);
        }
        inner.finish();
    }

    /// Close the object.
    pub fn finish(self) {
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_python_ensure_ascii() {
        let mut s = String::new();
        write_str(&mut s, "a\"\\\n\u{1}é单😀\u{7f}");
        // Python escapes everything outside ' '..='~', DEL included.
        assert_eq!(s, r#""a\"\\\n\u0001\u00e9\u5355\ud83d\ude00\u007f""#);
    }
}
