//! A line-framed byte stream over a Unix socket, with a deadline on every read
//! and write.
//!
//! QMP and the guest's append service both speak one message per line. QEMU or
//! the guest may stop answering at any moment (a paused VM, a hung process), so
//! no read here blocks past the caller's deadline: a read that runs out of time
//! returns `Ok(None)` and keeps what it had read so far, so a late answer is
//! still framed correctly by the next call.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The shortest socket timeout set: zero means "no timeout" to the OS.
const MIN_WAIT: Duration = Duration::from_millis(1);

pub(crate) struct LineStream {
    stream: UnixStream,
    /// Bytes read but not yet returned as a line.
    pending: Vec<u8>,
    /// A line longer than this is a protocol error, not a reason to grow forever.
    max_line: usize,
}

impl LineStream {
    pub(crate) fn connect(path: &Path, max_line: usize) -> io::Result<Self> {
        Ok(LineStream {
            stream: UnixStream::connect(path)?,
            pending: Vec::new(),
            max_line,
        })
    }

    /// Writes `bytes` whole, or fails once `deadline` passes.
    pub(crate) fn send(&mut self, bytes: &[u8], deadline: Instant) -> io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out"));
            }
            self.stream.set_write_timeout(Some(left.max(MIN_WAIT)))?;
            match self.stream.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The next line without its `\n` (and without a trailing `\r`), or
    /// `Ok(None)` when `deadline` passes first. End of stream is an
    /// `UnexpectedEof` error.
    pub(crate) fn read_line(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            if self.pending.len() > self.max_line {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a line longer than {} bytes", self.max_line),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left.max(MIN_WAIT)))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Errors after which the loop checks its deadline and tries again.
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (LineStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let lines = LineStream {
            stream: a,
            pending: Vec::new(),
            max_line: 16,
        };
        (lines, b)
    }

    #[test]
    fn lines_are_split_and_a_partial_line_survives_a_timeout() {
        let (mut lines, mut peer) = pair();
        peer.write_all(b"one\r\ntw").unwrap();
        let soon = || Instant::now() + Duration::from_millis(20);
        assert_eq!(lines.read_line(soon()).unwrap(), Some(b"one".to_vec()));
        assert_eq!(lines.read_line(soon()).unwrap(), None, "no full line yet");
        peer.write_all(b"o\n").unwrap();
        assert_eq!(lines.read_line(soon()).unwrap(), Some(b"two".to_vec()));
    }

    #[test]
    fn eof_and_overlong_lines_are_errors() {
        let (mut lines, mut peer) = pair();
        peer.write_all(&[b'x'; 40]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        let err = lines.read_line(deadline).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (mut lines, peer) = pair();
        drop(peer);
        let err = lines.read_line(deadline).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
