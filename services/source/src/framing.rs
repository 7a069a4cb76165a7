//! Records from `sdk-events.tsv`: one Kafka record a line, `KEY<TAB>VALUE`.
//!
//! A record ends at `\n` only (a `\r` belongs to the VALUE); every line is a
//! record, empty ones too; a line with no TAB is all KEY with an empty VALUE
//! (SPEC rule 1 then rejects it as malformed). The last line needs no `\n`.

/// Split a line (without its `\n`) into KEY and VALUE at the first TAB.
pub fn split_record(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr(b'\t', line) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// The lines of `chunk`, which holds whole lines: each ends with `\n`, except
/// possibly the last one of the input. The `\n` is not part of the line.
pub fn lines(chunk: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = chunk.strip_suffix(b"\n").unwrap_or(chunk);
    let empty = chunk.is_empty();
    body.split(|&b| b == b'\n').filter(move |_| !empty)
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
    fn every_line_is_a_record() {
        let got: Vec<&[u8]> = lines(b"a\tb\n\nc\r\n").collect();
        assert_eq!(got, [&b"a\tb"[..], b"", b"c\r"]);
        let got: Vec<&[u8]> = lines(b"x\ny").collect();
        assert_eq!(got, [&b"x"[..], b"y"]);
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"\n").count(), 1);
    }
}
