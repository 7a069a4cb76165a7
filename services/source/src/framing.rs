//! Records from `sdk-events.tsv`: one Kafka record a line, `KEY<TAB>VALUE`.
//!
//! A record ends at `\n` only (a `\r` belongs to the VALUE); every line is a
//! record, empty ones too; a line with no TAB is all KEY with an empty VALUE
//! (SPEC rule 1 then rejects it as malformed). The last line needs no `\n`.

/// Split a line (without its `\n`) into KEY and VALUE at the first TAB.
pub fn split_record(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b'\t', line) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

/// The lines of `chunk`, which holds whole lines: each ends with `\n`, except
/// possibly the last one of the input. The `\n` is not part of the line.
/// (SIMD search: the reader and the parsers scan every byte of the input.)
pub fn lines(chunk: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = (!chunk.is_empty()).then_some(chunk);
    std::iter::from_fn(move || {
        let text = rest?;
        match memchr::memchr(b'\n', text) {
            Some(i) => {
                rest = (i + 1 < text.len()).then(|| &text[i + 1..]);
                Some(&text[..i])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// How many lines [`lines`] yields for `chunk`.
pub fn count_lines(chunk: &[u8]) -> u64 {
    let newlines = memchr::memchr_iter(b'\n', chunk).count() as u64;
    newlines + u64::from(!chunk.is_empty() && !chunk.ends_with(b"\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_the_first_tab_only() {
        assert_eq!(split_record(b"k\tv\tw"), (&b"k"[..], &b"v\tw"[..]));
        assert_eq!(split_record(b"no tab"), (&b"no tab"[..], &b""[..]));
        assert_eq!(split_record(b""), (&b""[..], &b""[..]));
    }

    #[test]
    fn counting_agrees_with_splitting() {
        for chunk in [&b""[..], b"\n", b"\n\n", b"a", b"a\n", b"a\nb", b"a\n\nb\n", b"\t\n\r\n"] {
            assert_eq!(count_lines(chunk), lines(chunk).count() as u64, "{chunk:?}");
        }
    }

    #[test]
    fn every_line_is_a_record() {
        let got: Vec<&[u8]> = lines(b"a\tb\n\nc\r\n").collect();
        assert_eq!(got, [&b"a\tb"[..], b"", b"c\r"]);
        let got: Vec<&[u8]> = lines(b"x\ny").collect();
        assert_eq!(got, [&b"x"[..], b"y"]);
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"\n").count(), 1);
    }
}
