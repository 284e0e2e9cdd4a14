//! gzip (RFC 1952) for downloads: a raw-deflate compressor at level 1 wrapped in the
//! gzip header and trailer, with compressors reused from a small pool. Creating a
//! compressor costs ~50 µs (its tables are allocated and zeroed), three times the
//! compression of a 4 KiB file; the Python SDK asks for gzip on every read, so small
//! reads would mostly pay for set-up.

use std::io::{self, Write};
use std::sync::Mutex;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

/// Compressors kept for reuse (each holds ~300 KiB of tables).
const POOL_MAX: usize = 4;
/// Compressed bytes produced per step.
const OUT_STEP: usize = 64 * 1024;

static POOL: Mutex<Vec<Compress>> = Mutex::new(Vec::new());

fn take() -> Compress {
    let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
    pooled.unwrap_or_else(|| Compress::new(Compression::fast(), false))
}

fn give_back(mut c: Compress) {
    c.reset();
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < POOL_MAX {
        pool.push(c);
    }
}

/// A gzip stream written to an inner writer.
pub struct GzipWriter<W: Write> {
    /// `None` once finished.
    inner: Option<W>,
    c: Option<Compress>,
    crc: Crc,
    out: Vec<u8>,
}

fn finished() -> io::Error {
    io::Error::other("gzip stream already finished")
}

impl<W: Write> GzipWriter<W> {
    pub fn new(mut inner: W) -> io::Result<Self> {
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=4 (fastest) OS=3 (Unix)
        inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 3])?;
        Ok(GzipWriter {
            inner: Some(inner),
            c: Some(take()),
            crc: Crc::new(),
            out: Vec::with_capacity(OUT_STEP),
        })
    }

    /// One compressor call; returns (input consumed, output produced, status).
    fn step(&mut self, input: &[u8], flush: FlushCompress) -> io::Result<(usize, usize, Status)> {
        let (Some(c), Some(inner)) = (self.c.as_mut(), self.inner.as_mut()) else {
            return Err(finished());
        };
        self.out.clear();
        let before = c.total_in();
        let status = c
            .compress_vec(input, &mut self.out, flush)
            .map_err(io::Error::other)?;
        let consumed = usize::try_from(c.total_in() - before).unwrap_or(input.len());
        inner.write_all(&self.out)?;
        Ok((consumed, self.out.len(), status))
    }

    /// Writes the end of the deflate stream and the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        loop {
            let (_, produced, status) = self.step(&[], FlushCompress::Finish)?;
            if status == Status::StreamEnd {
                break;
            }
            if produced == 0 {
                return Err(io::Error::other("the compressor made no progress"));
            }
        }
        if let Some(c) = self.c.take() {
            give_back(c);
        }
        let mut inner = self.inner.take().ok_or_else(finished)?;
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        inner.write_all(&trailer)?;
        Ok(inner)
    }
}

impl<W: Write> Write for GzipWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.crc.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let (consumed, produced, _) = self.step(rest, FlushCompress::None)?;
            if consumed == 0 && produced == 0 {
                return Err(io::Error::other("the compressor made no progress"));
            }
            rest = &rest[consumed..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.as_mut().ok_or_else(finished)?.flush()
    }
}

impl<W: Write> Drop for GzipWriter<W> {
    fn drop(&mut self) {
        // An unfinished stream (error, client gone): the compressor is still reusable.
        if let Some(c) = self.c.take() {
            give_back(c);
        }
    }
}

/// `data` gzip-compressed in one go.
pub fn gzip_all(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut w = GzipWriter::new(Vec::with_capacity(data.len() / 2 + 64))?;
    w.write_all(data)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn round_trips_and_reuses_compressors() {
        for data in [
            Vec::new(),
            b"hello".to_vec(),
            b"abc".repeat(100_000),
            (0..300_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ] {
            let z = gzip_all(&data).expect("gzip");
            assert_eq!(gunzip(&z), data);
            // Again, with a pooled (reset) compressor.
            let z2 = gzip_all(&data).expect("gzip");
            assert_eq!(z, z2, "same output after reset");
        }
        // Streamed in odd pieces, and an abandoned stream returns its compressor.
        let data = b"0123456789".repeat(50_000);
        let mut w = GzipWriter::new(Vec::new()).expect("new");
        for piece in data.chunks(7_777) {
            w.write_all(piece).expect("write");
        }
        assert_eq!(gunzip(&w.finish().expect("finish")), data);
        let mut abandoned = GzipWriter::new(Vec::new()).expect("new");
        abandoned.write_all(b"partial").expect("write");
        drop(abandoned);
        assert!(!POOL.lock().expect("pool").is_empty());
    }
}
