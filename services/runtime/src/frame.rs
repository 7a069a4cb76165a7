//! Batches over a byte stream (a pipe, a file): each encoded batch preceded by
//! its length, a `u32` little-endian.
//!
//! This is the stdio transport of the stage binaries (`sluice-source |
//! sluice-enrich | sluice-window | sluice-sink`): the same Cap'n Proto
//! batches the distributed transport carries, over the simplest channel there
//! is. A stream that ends in the middle of a frame is an error, never a
//! silently shorter input.

use std::io::{self, Read, Write};

/// Frames larger than this are refused as corrupt (a batch is far smaller).
pub const MAX_FRAME_BYTES: u32 = 1 << 30;

/// Write one frame.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&n| n <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "batch larger than a frame may be"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)
}

/// Read one frame; `None` at a clean end of the stream (between frames).
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ends inside a frame header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes: not a batch stream")));
    }
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes)
        .map_err(|e| io::Error::new(e.kind(), format!("stream ends inside a frame of {len} bytes: {e}")))?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_truncation_is_an_error() -> io::Result<()> {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"one")?;
        write_frame(&mut buf, b"")?;
        write_frame(&mut buf, &[7u8; 1000])?;
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r)?, Some(b"one".to_vec()));
        assert_eq!(read_frame(&mut r)?, Some(Vec::new()));
        assert_eq!(read_frame(&mut r)?.map(|f| f.len()), Some(1000));
        assert_eq!(read_frame(&mut r)?, None);
        let mut cut = &buf[..buf.len() - 1];
        for _ in 0..2 {
            read_frame(&mut cut)?;
        }
        assert!(read_frame(&mut cut).is_err(), "a cut frame is an error");
        assert!(read_frame(&mut &[1u8, 0][..]).is_err(), "a cut header is an error");
        assert!(read_frame(&mut &[0xFF; 8][..]).is_err(), "a giant length is refused");
        Ok(())
    }
}

/// Progress of a stage binary on stdio: a line on stderr every few seconds
/// and a last one at the end (stdout carries the batches).
#[derive(Debug)]
pub struct Meter {
    name: &'static str,
    started: std::time::Instant,
    last: std::time::Instant,
    /// Batches read.
    pub batches_in: u64,
    /// Records (uploads, events or rows) read.
    pub records_in: u64,
    /// Batches written.
    pub batches_out: u64,
}

impl Meter {
    /// A meter for the stage `name`.
    pub fn new(name: &'static str) -> Self {
        let now = std::time::Instant::now();
        Self { name, started: now, last: now, batches_in: 0, records_in: 0, batches_out: 0 }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        format!(
            "{}: {} batches ({} records) in, {} batches out, {:.1}s",
            self.name, self.batches_in, self.records_in, self.batches_out, secs
        )
    }

    /// Count and, every 5 s, report.
    pub fn tick(&mut self) {
        if self.last.elapsed() >= std::time::Duration::from_secs(5) {
            eprintln!("{}", self.line());
            self.last = std::time::Instant::now();
        }
    }

    /// The last report.
    pub fn finish(&self) {
        eprintln!("{} (done)", self.line());
    }
}
