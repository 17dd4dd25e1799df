//! How a byte stream lies in a page stream's address space, and how the target puts
//! it back together: plain data, no I/O.
//!
//! * A *data page* `i` (the `i`-th page the source filled) is `[u16 little-endian
//!   length][length bytes][zeros]`, the length from 1 to [`PAGE_PAYLOAD`]. Every page
//!   says how much of it is stream, so the source can send a page before it is full
//!   (when its input goes quiet) and the last page needs no padding rule.
//! * The *trailer page*, at the fixed page number [`TRAILER_PAGE`] (above any data
//!   page a stream can reach), is `FERRYEOF`, the stream's length in bytes and its
//!   number of data pages (u64 little-endian each). It is sent after every data page.
//!
//! [`PageWriter`] cuts the source's writes into batches of whole data pages;
//! [`Reassembly`] takes pages in any order and hands back the stream in order,
//! holding at most `max_ahead` pages beyond the next one wanted.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use crate::protocol::PAGE_SIZE;

/// Stream bytes one data page carries.
pub const PAGE_PAYLOAD: usize = PAGE_SIZE - 2;
/// Where the trailer goes: 2^52 pages is 2^64 bytes, beyond any data page.
pub const TRAILER_PAGE: u64 = 1 << 52;
const TRAILER_MAGIC: &[u8; 8] = b"FERRYEOF";

/// What the trailer declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub length: u64,
    pub pages: u64,
}

impl Trailer {
    pub fn encode(&self) -> Bytes {
        let mut page = vec![0u8; PAGE_SIZE];
        page[..8].copy_from_slice(TRAILER_MAGIC);
        page[8..16].copy_from_slice(&self.length.to_le_bytes());
        page[16..24].copy_from_slice(&self.pages.to_le_bytes());
        Bytes::from(page)
    }

    pub fn decode(page: &[u8]) -> Result<Trailer, String> {
        if page.len() != PAGE_SIZE || &page[..8] != TRAILER_MAGIC {
            return Err("the trailer page is not a trailer".into());
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&page[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let t = Trailer {
            length: word(8),
            pages: word(16),
        };
        // Each page carries 1..=PAGE_PAYLOAD bytes.
        let fits = t.length >= t.pages && t.length <= t.pages.saturating_mul(PAGE_PAYLOAD as u64);
        if !fits || t.pages > TRAILER_PAGE {
            return Err(format!(
                "the trailer declares {} bytes in {} pages",
                t.length, t.pages
            ));
        }
        Ok(t)
    }
}

/// The source side: stream bytes in, batches of whole data pages out.
pub struct PageWriter {
    batch_pages: usize,
    batch: BytesMut,
    /// Stream bytes in the batch's last page, when that page is still open.
    open_fill: Option<usize>,
    /// The page number the batch starts at.
    first: u64,
    length: u64,
}

impl PageWriter {
    /// Batches of `batch_pages` pages (the page stream's chunk size).
    pub fn new(batch_pages: usize) -> PageWriter {
        PageWriter {
            batch_pages: batch_pages.max(1),
            batch: BytesMut::new(),
            open_fill: None,
            first: 0,
            length: 0,
        }
    }

    /// Takes bytes from `data` until it is used up or the batch is full; returns how
    /// many it took.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        let mut taken = 0;
        while taken < data.len() {
            let fill = match self.open_fill {
                Some(f) => f,
                None => {
                    if self.batch.len() / PAGE_SIZE >= self.batch_pages {
                        break;
                    }
                    if self.batch.is_empty() {
                        self.batch.reserve(self.batch_pages * PAGE_SIZE);
                    }
                    self.batch.resize(self.batch.len() + PAGE_SIZE, 0);
                    0
                }
            };
            let n = (PAGE_PAYLOAD - fill).min(data.len() - taken);
            let page = self.batch.len() - PAGE_SIZE;
            self.batch[page + 2 + fill..page + 2 + fill + n]
                .copy_from_slice(&data[taken..taken + n]);
            let fill = fill + n;
            self.batch[page..page + 2].copy_from_slice(&(fill as u16).to_le_bytes());
            self.open_fill = (fill < PAGE_PAYLOAD).then_some(fill);
            taken += n;
        }
        self.length += taken as u64;
        taken
    }

    /// The batch, once it holds `batch_pages` full pages: `(first page, pages)`.
    pub fn take_full(&mut self) -> Option<(u64, Bytes)> {
        let full = self.open_fill.is_none() && self.batch.len() / PAGE_SIZE >= self.batch_pages;
        full.then(|| self.take())
    }

    /// Whatever the batch holds, its last page possibly part-filled (it is closed:
    /// the next byte starts a new page). `None` when empty.
    pub fn take_any(&mut self) -> Option<(u64, Bytes)> {
        (!self.batch.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> (u64, Bytes) {
        let pages = (self.batch.len() / PAGE_SIZE) as u64;
        let first = self.first;
        self.first += pages;
        self.open_fill = None;
        (first, self.batch.split().freeze())
    }

    pub fn has_pending(&self) -> bool {
        !self.batch.is_empty()
    }

    /// The trailer for what was written, once every batch has been taken.
    pub fn trailer(&self) -> Trailer {
        Trailer {
            length: self.length,
            pages: self.first,
        }
    }

    pub fn length(&self) -> u64 {
        self.length
    }
}

/// Why the target refuses what it was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    LengthMismatch { declared: u64, received: u64 },
    Malformed(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::LengthMismatch { declared, received } => write!(
                f,
                "length mismatch: the source declared {declared} bytes, {received} arrived"
            ),
            Refused::Malformed(m) => write!(f, "malformed byte stream: {m}"),
        }
    }
}

/// The target side: pages in any order, the stream out in order.
pub struct Reassembly {
    waiting: BTreeMap<u64, Bytes>,
    next: u64,
    max_ahead: u64,
    trailer: Option<Trailer>,
    delivered: u64,
    buffered: u64,
    peak_buffered: u64,
}

impl Reassembly {
    /// Holds pages at most `max_ahead` beyond the next one wanted.
    pub fn new(max_ahead: u64) -> Reassembly {
        Reassembly {
            waiting: BTreeMap::new(),
            next: 0,
            max_ahead: max_ahead.max(1),
            trailer: None,
            delivered: 0,
            buffered: 0,
            peak_buffered: 0,
        }
    }

    /// Takes page `page`. A copy of a page already taken or held is ignored.
    pub fn accept(&mut self, page: u64, data: &[u8]) -> Result<(), Refused> {
        if page == TRAILER_PAGE {
            let t = Trailer::decode(data).map_err(Refused::Malformed)?;
            if self.trailer.is_some_and(|old| old != t) {
                return Err(Refused::Malformed("two different trailers".into()));
            }
            let beyond = self
                .waiting
                .keys()
                .next_back()
                .is_some_and(|p| *p >= t.pages);
            if beyond || self.next > t.pages {
                return Err(Refused::LengthMismatch {
                    declared: t.length,
                    received: self.delivered + self.buffered,
                });
            }
            self.trailer = Some(t);
            return self.check_end();
        }
        if page > TRAILER_PAGE {
            return Err(Refused::Malformed(format!(
                "page {page} beyond the trailer"
            )));
        }
        if let Some(t) = self.trailer {
            if page >= t.pages {
                return Err(Refused::LengthMismatch {
                    declared: t.length,
                    received: t.length.saturating_add(1),
                });
            }
        }
        if page < self.next || self.waiting.contains_key(&page) {
            return Ok(());
        }
        if page - self.next >= self.max_ahead {
            return Err(Refused::Malformed(format!(
                "page {page} is more than {} pages ahead of page {}",
                self.max_ahead, self.next
            )));
        }
        if data.len() != PAGE_SIZE {
            return Err(Refused::Malformed(format!("a {}-byte page", data.len())));
        }
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        if len == 0 || len > PAGE_PAYLOAD {
            return Err(Refused::Malformed(format!(
                "page {page} declares {len} bytes"
            )));
        }
        self.waiting
            .insert(page, Bytes::copy_from_slice(&data[2..2 + len]));
        self.buffered += len as u64;
        self.peak_buffered = self.peak_buffered.max(self.buffered);
        Ok(())
    }

    /// The next piece of the stream, if it has arrived.
    pub fn take(&mut self) -> Option<Bytes> {
        let piece = self.waiting.remove(&self.next)?;
        self.next += 1;
        self.buffered -= piece.len() as u64;
        self.delivered += piece.len() as u64;
        Some(piece)
    }

    /// Every page is taken and the trailer agrees with what was: `Ok(true)`.
    pub fn at_end(&self) -> Result<bool, Refused> {
        match self.trailer {
            Some(t) if self.next == t.pages => self.check_end().map(|()| true),
            _ => Ok(false),
        }
    }

    fn check_end(&self) -> Result<(), Refused> {
        match self.trailer {
            Some(t) if self.next == t.pages && self.delivered != t.length => {
                Err(Refused::LengthMismatch {
                    declared: t.length,
                    received: self.delivered,
                })
            }
            _ => Ok(()),
        }
    }

    /// Pages below this one are taken.
    pub fn next_page(&self) -> u64 {
        self.next
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Stream bytes held for the consumer now, and at most so far.
    pub fn buffered(&self) -> (u64, u64) {
        (self.buffered, self.peak_buffered)
    }

    pub fn trailer(&self) -> Option<Trailer> {
        self.trailer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    /// Writes `data` in pieces of `sizes` (cycled), closing a batch early after each
    /// piece listed in `flush_after`; returns every batch and the trailer.
    fn write_all(
        data: &[u8],
        sizes: &[usize],
        flush_after: &[usize],
    ) -> (Vec<(u64, Bytes)>, Trailer) {
        let mut w = PageWriter::new(4);
        let mut out = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < data.len() {
            let end = (at + sizes[i % sizes.len()]).min(data.len());
            let mut piece = &data[at..end];
            while !piece.is_empty() {
                let n = w.fill(piece);
                piece = &piece[n..];
                out.extend(w.take_full());
            }
            if flush_after.contains(&i) {
                out.extend(w.take_any());
            }
            at = end;
            i += 1;
        }
        out.extend(w.take_any());
        (out, w.trailer())
    }

    fn pages_of(batches: &[(u64, Bytes)]) -> Vec<(u64, Bytes)> {
        batches
            .iter()
            .flat_map(|(first, b)| {
                (0..b.len() / PAGE_SIZE).map(move |i| {
                    (
                        first + i as u64,
                        b.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn pages_in_any_order_give_back_the_stream() {
        let data = pattern(100_000);
        let (batches, trailer) = write_all(&data, &[1, 4094, 4095, 9000, 3], &[2, 7]);
        assert_eq!(trailer.length, data.len() as u64);
        let mut pages = pages_of(&batches);
        assert_eq!(pages.len() as u64, trailer.pages);
        // Deliver back to front-ish: every third page first, then the rest reversed.
        let (thirds, mut rest): (Vec<_>, Vec<_>) = pages.drain(..).partition(|(p, _)| p % 3 == 0);
        rest.reverse();
        let mut r = Reassembly::new(1 << 20);
        r.accept(TRAILER_PAGE, &trailer.encode()).unwrap();
        let mut got = Vec::new();
        for (p, page) in thirds.iter().chain(rest.iter()) {
            r.accept(*p, page).unwrap();
            r.accept(*p, page).unwrap(); // a resent copy changes nothing
            while let Some(piece) = r.take() {
                got.extend_from_slice(&piece);
            }
        }
        assert_eq!(r.at_end(), Ok(true));
        assert_eq!(got, data);
        assert_eq!(r.buffered().0, 0);
    }

    #[test]
    fn a_page_too_far_ahead_is_refused_and_the_buffer_stays_bounded() {
        let data = pattern(10 * PAGE_PAYLOAD);
        let (batches, _) = write_all(&data, &[PAGE_PAYLOAD], &[]);
        let pages = pages_of(&batches);
        let mut r = Reassembly::new(4);
        for (p, page) in &pages[1..4] {
            r.accept(*p, page).unwrap();
        }
        assert!(matches!(
            r.accept(4, &pages[4].1),
            Err(Refused::Malformed(_))
        ));
        assert_eq!(r.buffered().1, 3 * PAGE_PAYLOAD as u64);
        r.accept(0, &pages[0].1).unwrap();
        assert_eq!(r.take().map(|b| b.len()), Some(PAGE_PAYLOAD));
        assert_eq!(r.next_page(), 1);
        r.accept(4, &pages[4].1).unwrap();
    }

    #[test]
    fn a_trailer_that_disagrees_with_the_pages_is_a_length_mismatch() {
        let data = pattern(3 * PAGE_PAYLOAD + 10);
        let (batches, trailer) = write_all(&data, &[1000], &[]);
        let pages = pages_of(&batches);
        // Declares one byte more than was sent.
        let lying = Trailer {
            length: trailer.length + 1,
            ..trailer
        };
        let mut r = Reassembly::new(64);
        for (p, page) in &pages {
            r.accept(*p, page).unwrap();
        }
        r.accept(TRAILER_PAGE, &lying.encode()).unwrap();
        while r.take().is_some() {}
        assert!(matches!(r.at_end(), Err(Refused::LengthMismatch { .. })));
        // Declares fewer pages than were sent.
        let short = Trailer {
            length: 3 * PAGE_PAYLOAD as u64,
            pages: 3,
        };
        let mut r = Reassembly::new(64);
        r.accept(TRAILER_PAGE, &short.encode()).unwrap();
        assert!(matches!(
            r.accept(3, &pages[3].1),
            Err(Refused::LengthMismatch { .. })
        ));
        // Malformed pages and trailers.
        assert!(r.accept(0, &[0u8; PAGE_SIZE]).is_err());
        assert!(Trailer::decode(&[0u8; PAGE_SIZE]).is_err());
        let impossible = Trailer {
            length: 1,
            pages: 2,
        }
        .encode();
        assert!(Trailer::decode(&impossible).is_err());
    }

    #[test]
    fn an_empty_stream_is_just_a_trailer() {
        let w = PageWriter::new(64);
        let mut r = Reassembly::new(64);
        r.accept(TRAILER_PAGE, &w.trailer().encode()).unwrap();
        assert_eq!(r.at_end(), Ok(true));
        assert_eq!(r.delivered(), 0);
    }
}
