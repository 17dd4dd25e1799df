//! The append service's wire protocol, spoken over the guest's second serial
//! port, and a client for it.
//!
//! One request or reply per line; every request carries a tag the reply
//! repeats, so an answer that comes after its request timed out (the guest was
//! paused, then resumed) is recognised and skipped rather than taken for the
//! answer to the next request. Records are bytes, hex-encoded on the wire, at
//! most [`MAX_RECORD`] of them.
//!
//! | request          | reply                                          |
//! |------------------|------------------------------------------------|
//! | `P <tag>`        | `PONG <tag>`                                   |
//! | `A <tag> <len> <hex>` | `OK <tag> <seq>` (the record's sequence number, from 1) |
//! | `R <tag> <from>` | `REC <tag> <seq> <hex>` per record from `from`, then `END <tag> <count>` |
//!
//! Empty lines are skipped; anything else gets `ERR <tag> <reason>`. The
//! length lets the guest refuse a record whose line was cut short: bytes that
//! reached a source's serial port just before it paused move with the VM,
//! the rest of their line does not.

use super::lines::LineStream;
use crate::service::{ServiceError, MAX_RECORD};
use std::path::Path;
use std::time::{Duration, Instant};

/// A reply line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Pong { tag: u64 },
    Ok { tag: u64, seq: u64 },
    Record { tag: u64, seq: u64, data: Vec<u8> },
    End { tag: u64, count: u64 },
    Err { tag: u64, reason: String },
}

impl Reply {
    fn tag(&self) -> u64 {
        match self {
            Reply::Pong { tag }
            | Reply::Ok { tag, .. }
            | Reply::Record { tag, .. }
            | Reply::End { tag, .. }
            | Reply::Err { tag, .. } => *tag,
        }
    }
}

// Every request starts with a newline: it ends whatever partial line an
// earlier request cut short left in the guest (bytes that reached a source's
// serial port just before it paused move with the VM, the rest of their line
// does not), so the request is read whole. The guest skips empty lines.

pub fn ping(tag: u64) -> Vec<u8> {
    format!("\nP {tag}\n").into_bytes()
}

pub fn append(tag: u64, record: &[u8]) -> Vec<u8> {
    format!("\nA {tag} {} {}\n", record.len(), hex(record)).into_bytes()
}

pub fn read_from(tag: u64, from: u64) -> Vec<u8> {
    format!("\nR {tag} {from}\n").into_bytes()
}

/// Parses one reply line; `None` for anything that is not a reply (noise
/// left on the line by a request cut short, or garbage).
pub fn parse(line: &[u8]) -> Option<Reply> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ');
    let kind = words.next()?;
    let tag = words.next()?.parse().ok()?;
    let mut number = || words.next()?.parse::<u64>().ok();
    let reply = match kind {
        "PONG" => Reply::Pong { tag },
        "OK" => Reply::Ok {
            tag,
            seq: number()?,
        },
        "END" => Reply::End {
            tag,
            count: number()?,
        },
        "REC" => {
            let seq = number()?;
            let data = unhex(words.next().unwrap_or(""))?;
            Reply::Record { tag, seq, data }
        }
        "ERR" => Reply::Err {
            tag,
            reason: words.collect::<Vec<_>>().join(" "),
        },
        _ => return None,
    };
    Some(reply)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A connection to one guest's service socket.
pub struct AppendClient {
    lines: LineStream,
    next_tag: u64,
}

impl AppendClient {
    /// Connects to the service socket (QEMU's end of the serial port).
    pub fn connect(path: &Path) -> Result<AppendClient, ServiceError> {
        let lines =
            LineStream::connect(path, 8 * MAX_RECORD).map_err(|_| ServiceError::NotRunning)?;
        Ok(AppendClient { lines, next_tag: 1 })
    }

    /// Whether the service answers within `timeout`.
    pub fn ping(&mut self, timeout: Duration) -> Result<(), ServiceError> {
        let tag = self.tag();
        match self.call(&ping(tag), tag, timeout)? {
            Reply::Pong { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Appends `record`; its sequence number once the guest has stored it.
    /// [`ServiceError::Paused`] when no answer comes within `timeout` (the
    /// record may still be stored later, unacknowledged).
    pub fn append(&mut self, record: &[u8], timeout: Duration) -> Result<u64, ServiceError> {
        if record.len() > MAX_RECORD {
            return Err(ServiceError::TooLarge(record.len()));
        }
        let tag = self.tag();
        match self.call(&append(tag, record), tag, timeout)? {
            Reply::Ok { seq, .. } => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    /// Every record, in order, as (sequence number, bytes). `timeout` bounds
    /// the wait for each line, not the whole listing: a long log takes a while
    /// over a serial port.
    pub fn records(&mut self, timeout: Duration) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        let tag = self.tag();
        let mut records = Vec::new();
        let mut reply = self.call(&read_from(tag, 1), tag, timeout)?;
        loop {
            match reply {
                Reply::Record { seq, data, .. } => records.push((seq, data)),
                Reply::End { count, .. } if count == records.len() as u64 => return Ok(records),
                other => return Err(unexpected(other)),
            }
            reply = self.reply(tag, Instant::now() + timeout)?;
        }
    }

    fn tag(&mut self) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        tag
    }

    fn call(&mut self, request: &[u8], tag: u64, timeout: Duration) -> Result<Reply, ServiceError> {
        let deadline = Instant::now() + timeout;
        self.lines
            .send(request, deadline)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => ServiceError::Paused,
                _ => ServiceError::NotRunning,
            })?;
        self.reply(tag, deadline)
    }

    /// The next reply to `tag`, skipping replies to earlier requests.
    fn reply(&mut self, tag: u64, deadline: Instant) -> Result<Reply, ServiceError> {
        loop {
            match self.lines.read_line(deadline) {
                Ok(None) => return Err(ServiceError::Paused),
                Err(_) => return Err(ServiceError::NotRunning),
                Ok(Some(line)) => match parse(&line) {
                    Some(reply) if reply.tag() == tag => return Ok(reply),
                    _ => {}
                },
            }
        }
    }
}

fn unexpected(reply: Reply) -> ServiceError {
    ServiceError::Corrupt(format!("unexpected reply from the guest: {reply:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_lines() {
        assert_eq!(append(7, b"\x00hi\n"), b"\nA 7 4 0068690a\n");
        assert_eq!(append(8, b""), b"\nA 8 0 \n");
        assert_eq!(read_from(9, 1), b"\nR 9 1\n");
        assert_eq!(ping(1), b"\nP 1\n");
    }

    #[test]
    fn replies_parse_and_noise_does_not() {
        assert_eq!(parse(b"OK 7 42"), Some(Reply::Ok { tag: 7, seq: 42 }));
        assert_eq!(parse(b"PONG 3"), Some(Reply::Pong { tag: 3 }));
        assert_eq!(
            parse(b"REC 9 2 0068690a"),
            Some(Reply::Record {
                tag: 9,
                seq: 2,
                data: b"\x00hi\n".to_vec()
            })
        );
        assert_eq!(
            parse(b"REC 9 3 "),
            Some(Reply::Record {
                tag: 9,
                seq: 3,
                data: vec![]
            })
        );
        assert_eq!(parse(b"END 9 3"), Some(Reply::End { tag: 9, count: 3 }));
        assert_eq!(
            parse(b"ERR 4 not-hex"),
            Some(Reply::Err {
                tag: 4,
                reason: "not-hex".into()
            })
        );
        for noise in [
            &b""[..],
            b"OK",
            b"OK x 1",
            b"OK 1",
            b"REC 1 2 abc",
            b"REC 1 2 zz",
            b"\xff",
        ] {
            assert_eq!(parse(noise), None, "{noise:?}");
        }
    }

    #[test]
    fn hex_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&all)), Some(all));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("g0"), None);
        assert_eq!(unhex("+f"), None);
    }
}
