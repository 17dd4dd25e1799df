//! The Ferry wire protocol: every byte two nodes exchange is defined in this file
//! and nowhere else, so a reader can check compatibility in one place (the way
//! Cloud Hypervisor keeps its migration protocol in `vm-migration/src/protocol.rs`).
//!
//! Everything here is pure: encoders build byte vectors, decoders take byte slices.
//! The async reading and writing lives in `framing.rs`.
//!
//! # Frames
//!
//! Every QUIC stream carries a sequence of frames:
//!
//! ```text
//! +----------------+---------+------------------------+
//! | length: u32 LE | tag: u8 | body: length - 1 bytes |
//! +----------------+---------+------------------------+
//! ```
//!
//! `length` counts the tag and the body. A receiver checks it against its maximum
//! frame size *before* allocating anything, and closes the connection with
//! [`CloseCode::FrameTooLarge`] when it is exceeded.
//!
//! # Connections
//!
//! The client opens a bidirectional stream and sends [`Tag::Hello`]: the magic
//! `FRRY`, the highest protocol version it speaks as a `u16`, then (bincode) the node id
//! it claims and the purpose of the connection, then — when it speaks a range of
//! versions — the lowest version it speaks as a `u16`:
//!
//! ```text
//! FRRY | max: u16 LE | bincode(node id, purpose) | [min: u16 LE]
//! ```
//!
//! The magic and the version come first and never move, so any version can read them
//! and refuse clearly ([`CloseCode::VersionMismatch`]). The lowest version goes *last*:
//! a build from before version ranges reads the fixed field, and either refuses it
//! clearly (another version) or reads the rest as it always did; it never takes the
//! range for part of the node id. A client that speaks one version sends no `min` at
//! all, byte for byte the hello of a build from before ranges. Such a build refuses a
//! range (trailing bytes, when the highest version is its own) or the highest version;
//! a client refused so offers its versions one at a time in old-style hellos
//! (`RpcNode::open_connection`).
//!
//! The server negotiates the highest version both speak ([`Versions::negotiate`]) and,
//! when the client sent a range, appends it to its answer. No common version: the
//! connection is closed with [`CloseCode::VersionMismatch`] and a reason naming both
//! ranges. Each connection keeps its negotiated version; only the page stream's format
//! differs between the versions spoken today (listed chunks need
//! [`LISTED_CHUNKS_SINCE`]).
//!
//! The server checks the claimed id against the client's certificate, then answers
//! [`Tag::HelloOk`]: (bincode) its node id, then the negotiated version as a `u16` when
//! the client sent a range. Until that answer arrives a connection is not "up": quinn
//! only reports a refused client certificate at the first stream operation, and the
//! hello is that operation.
//!
//! * `Purpose::Rpc`: each request is one bidirectional stream carrying one
//!   [`Tag::Request`] frame and answered by one [`Tag::Response`] frame; a one-way
//!   message is one unidirectional stream carrying one [`Tag::Message`] frame.
//! * `Purpose::PageStream`: the hello stream stays open as the path's control channel
//!   ([`Tag::Control`] frames both ways: pings, acknowledgements, finish, cancel), and
//!   the sender opens one unidirectional data stream of [`Tag::Chunk`] frames.
//!
//! Any violation (unknown tag, malformed body, oversized length, wrong version, wrong
//! identity) closes that one connection with a [`CloseCode`] and a readable reason.

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// ALPN identifier. Deliberately without a version: a version mismatch must reach the
/// hello, where it is reported clearly, instead of failing the TLS handshake.
pub const ALPN: &[u8] = b"ferry";
/// First bytes of every hello body.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// The highest protocol version this build speaks, the one it prefers.
///
/// * 2: requests carry the caller's id.
/// * 3: listed chunks ([`ChunkHeader::listed`]).
pub const VERSION: u16 = 3;
/// The lowest protocol version this build still speaks: one version back, so a
/// cluster upgrades node by node (see ARCHITECTURE.md, *Upgrades*).
pub const MIN_VERSION: u16 = 2;
/// The first version whose page stream may carry listed chunks.
pub const LISTED_CHUNKS_SINCE: u16 = 3;
/// Bytes before the body: the `u32` length and the tag.
pub const FRAME_HEADER_LEN: usize = 5;
/// Guest page size carried by the page stream.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one chunk frame may cover (zero chunks included): bounds the work one
/// frame can cause on the receiver.
pub const MAX_CHUNK_PAGES: u32 = 1 << 16;
/// Rounds and sequence numbers are packed into one `u64` page version on the receiver
/// (see `stream::versions`), which bounds both.
pub const MAX_ROUND: u32 = (1 << 24) - 1;
/// See [`MAX_ROUND`]. Sequence numbers start at 1: version 0 means "never written".
pub const MAX_SEQ: u64 = (1 << 40) - 1;
/// Largest hello or control frame accepted regardless of the configured maximum.
pub const MAX_CONTROL_FRAME: u32 = 1 << 20;
/// Size of the fixed header inside a chunk body.
pub const CHUNK_HEADER_LEN: usize = 8 + 4 + 8 + 4 + 1;

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    Hello = 1,
    HelloOk = 2,
    Request = 3,
    Message = 4,
    Response = 5,
    Control = 6,
    Chunk = 7,
}

impl Tag {
    pub fn from_u8(v: u8) -> Option<Tag> {
        Some(match v {
            1 => Tag::Hello,
            2 => Tag::HelloOk,
            3 => Tag::Request,
            4 => Tag::Message,
            5 => Tag::Response,
            6 => Tag::Control,
            7 => Tag::Chunk,
            _ => return None,
        })
    }
}

/// Application close codes: why a connection was closed. The reason bytes that
/// accompany them are human-readable UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    Normal = 0,
    Protocol = 1,
    FrameTooLarge = 2,
    VersionMismatch = 3,
    PeerIdentity = 4,
    UnknownStream = 5,
    Shutdown = 6,
    Cancelled = 7,
    SinkFailed = 8,
    PathDead = 9,
    /// The peer node already holds as many connections as a node may (see
    /// `PeerLimits::max_connections_per_peer`).
    TooManyConnections = 10,
}

impl CloseCode {
    pub fn from_u64(v: u64) -> Option<CloseCode> {
        Some(match v {
            0 => CloseCode::Normal,
            1 => CloseCode::Protocol,
            2 => CloseCode::FrameTooLarge,
            3 => CloseCode::VersionMismatch,
            4 => CloseCode::PeerIdentity,
            5 => CloseCode::UnknownStream,
            6 => CloseCode::Shutdown,
            7 => CloseCode::Cancelled,
            8 => CloseCode::SinkFailed,
            9 => CloseCode::PathDead,
            10 => CloseCode::TooManyConnections,
            _ => return None,
        })
    }

    pub fn to_varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }
}

/// A violation of this protocol by the peer (or by a local caller, for sizes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("unexpected {got:?} frame, expected {expected}")]
    Unexpected { got: Tag, expected: &'static str },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("peer speaks protocol {theirs}, this node speaks {ours}: no version in common")]
    VersionMismatch { ours: Versions, theirs: Versions },
}

/// A range of protocol versions, `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    pub min: u16,
    pub max: u16,
}

impl Versions {
    /// What this build speaks: [`MIN_VERSION`] to [`VERSION`].
    pub const THIS_BUILD: Versions = Versions {
        min: MIN_VERSION,
        max: VERSION,
    };

    /// Only `v`: what a build from before version ranges spoke.
    pub const fn only(v: u16) -> Versions {
        Versions { min: v, max: v }
    }

    pub fn contains(&self, v: u16) -> bool {
        (self.min..=self.max).contains(&v)
    }

    /// The highest version both `self` (ours) and `theirs` speak.
    pub fn negotiate(self, theirs: Versions) -> Result<u16, ProtocolError> {
        let (low, high) = (self.min.max(theirs.min), self.max.min(theirs.max));
        if low > high {
            return Err(ProtocolError::VersionMismatch { ours: self, theirs });
        }
        Ok(high)
    }
}

impl std::fmt::Display for Versions {
    /// "version 3", or "version 2 to version 3": both ends of a range are named as a
    /// version, so a reason reads the same whoever logged it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.max)
        } else {
            write!(f, "version {} to version {}", self.min, self.max)
        }
    }
}

impl ProtocolError {
    /// The close code a receiver uses when this error ends a connection.
    pub fn close_code(&self) -> CloseCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => CloseCode::FrameTooLarge,
            ProtocolError::VersionMismatch { .. } => CloseCode::VersionMismatch,
            _ => CloseCode::Protocol,
        }
    }
}

/// Why a connection is opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// Requests and one-way messages between services.
    Rpc,
    /// One path of a page stream.
    PageStream { stream_id: u64, path: u32 },
}

/// First frame on every connection, client to server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The highest version the client speaks: the fixed field every version reads.
    pub version: u16,
    /// The lowest version the client speaks when it speaks a range (sent after
    /// everything else); `None`: only `version`, as builds before ranges sent.
    pub min_version: Option<u16>,
    /// The id the client claims; the server checks it against the client certificate.
    pub node_id: NodeId,
    pub purpose: Purpose,
}

impl Hello {
    /// The versions the client speaks.
    pub fn versions(&self) -> Versions {
        Versions {
            min: self.min_version.unwrap_or(self.version),
            max: self.version,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct HelloRest {
    node_id: NodeId,
    purpose: Purpose,
}

/// The server's answer once it accepted the hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloOk {
    pub node_id: NodeId,
    /// The negotiated version, sent when the client's hello carried a range. `None`:
    /// the client's only version (an old-style hello, or a server from before ranges).
    pub version: Option<u16>,
}

#[derive(Serialize, Deserialize)]
struct HelloOkBody {
    node_id: NodeId,
}

/// Page-stream control messages, carried on the path's hello stream in both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Sender to receiver: liveness probe, answered by `Pong` with the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Receiver to sender: these chunks are applied to the sink.
    Ack {
        seqs: Vec<u64>,
    },
    /// Sender to receiver: every chunk was acknowledged; the stream is complete.
    Finish {
        chunks: u64,
        bytes: u64,
    },
    /// Receiver to sender: completion recorded.
    FinishAck,
    /// Either side: stop the stream.
    Cancel {
        reason: String,
    },
}

/// The fixed header of a chunk frame. A chunk covers `count` pages: the run from
/// `first`, or, when `listed`, the pages `first + offset` for `count` offsets that
/// follow the header (`u32`, strictly increasing, the first one 0). Dirty pages are
/// scattered, so later rounds batch them into listed chunks as full as round 0's
/// instead of paying a frame, a scheduler entry and an acknowledgement per page.
/// `data` (the pages in that order) follows unless `zero` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub seq: u64,
    pub round: u32,
    pub first: u64,
    pub count: u32,
    pub zero: bool,
    pub listed: bool,
}

/// Chunk flags (the header's last byte).
const CHUNK_ZERO: u8 = 1;
const CHUNK_LISTED: u8 = 2;

/// A decoded chunk body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkBody<'a> {
    pub header: ChunkHeader,
    /// The page offsets from `header.first` of a listed chunk.
    pub offsets: Option<Vec<u32>>,
    /// The page data, empty for a zero chunk.
    pub data: &'a [u8],
}

impl ChunkBody<'_> {
    /// The chunk's pages as maximal runs `(index in the chunk, first page, pages)`.
    pub fn runs(&self) -> Vec<(u32, u64, u32)> {
        let first = self.header.first;
        let Some(offsets) = &self.offsets else {
            return vec![(0, first, self.header.count)];
        };
        let mut runs: Vec<(u32, u64, u32)> = Vec::new();
        for (i, off) in offsets.iter().enumerate() {
            let page = first + u64::from(*off);
            match runs.last_mut() {
                Some((_, start, len)) if *start + u64::from(*len) == page => *len += 1,
                _ => runs.push((i as u32, page, 1)),
            }
        }
        runs
    }
}

/// Outcome of a request, as carried in a response frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    Ok(Vec<u8>),
    HandlerError(String),
    UnknownService(String),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_CONTROL_FRAME as usize }>()
}

fn encode_bincode<T: Serialize>(value: &T) -> Vec<u8> {
    // Only our own plain enums and structs pass through here; bincode cannot fail on them.
    bincode::serde::encode_to_vec(value, bincode_config()).unwrap_or_default()
}

/// Decodes a value at the start of `body`; returns it and the bytes it took.
fn decode_bincode_prefix<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<(T, usize), ProtocolError> {
    bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| ProtocolError::Malformed(format!("{what}: {e}")))
}

fn decode_bincode<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ProtocolError> {
    let (value, used) = decode_bincode_prefix(body, what)?;
    if used != body.len() {
        return Err(ProtocolError::Malformed(format!(
            "{what}: {} trailing bytes",
            body.len() - used
        )));
    }
    Ok(value)
}

/// The 5-byte frame header for a body of `body_len` bytes.
pub fn frame_header(tag: Tag, body_len: usize) -> [u8; FRAME_HEADER_LEN] {
    let len = (body_len + 1) as u32;
    let l = len.to_le_bytes();
    [l[0], l[1], l[2], l[3], tag as u8]
}

/// A whole frame (header and body) as one vector.
pub fn frame(tag: Tag, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&frame_header(tag, body.len()));
    out.extend_from_slice(body);
    out
}

/// Checks a frame header against `max` (the largest `length` accepted) and returns the
/// tag and the body length. Called before the body is allocated or read.
pub fn parse_frame_header(
    header: [u8; FRAME_HEADER_LEN],
    max: u32,
) -> Result<(Tag, usize), ProtocolError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if len > max {
        return Err(ProtocolError::FrameTooLarge {
            len: u64::from(len),
            max: u64::from(max),
        });
    }
    if len == 0 {
        return Err(ProtocolError::Malformed("zero-length frame".into()));
    }
    let tag = Tag::from_u8(header[4]).ok_or(ProtocolError::UnknownTag(header[4]))?;
    Ok((tag, (len - 1) as usize))
}

/// Encodes a hello frame. The versions are written as given so tests can speak
/// versions this build does not; `min_version` only when it differs from `version`,
/// so a client speaking one version sends exactly the hello of a build before ranges.
pub fn encode_hello(hello: &Hello) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.extend_from_slice(&MAGIC);
    body.extend_from_slice(&hello.version.to_le_bytes());
    body.extend_from_slice(&encode_bincode(&HelloRest {
        node_id: hello.node_id,
        purpose: hello.purpose.clone(),
    }));
    if let Some(min) = hello.min_version.filter(|m| *m != hello.version) {
        body.extend_from_slice(&min.to_le_bytes());
    }
    frame(Tag::Hello, &body)
}

/// Decodes a hello body, without judging its versions (see [`accept_hello`]).
pub fn decode_hello(body: &[u8]) -> Result<Hello, ProtocolError> {
    if body.len() < 6 || body[..4] != MAGIC {
        return Err(ProtocolError::Malformed(
            "hello does not start with the Ferry magic".into(),
        ));
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    let (rest, used): (HelloRest, usize) = decode_bincode_prefix(&body[6..], "hello")?;
    let min_version = match &body[6 + used..] {
        [] => None,
        [a, b] => Some(u16::from_le_bytes([*a, *b])),
        // A later version may append more after the lowest version (it must then
        // always send the lowest version); only a hello above this build's version
        // may carry such bytes.
        [a, b, ..] if version > VERSION => Some(u16::from_le_bytes([*a, *b])),
        other => {
            return Err(ProtocolError::Malformed(format!(
                "hello: {} trailing bytes",
                other.len()
            )))
        }
    };
    if let Some(min) = min_version.filter(|m| *m > version) {
        return Err(ProtocolError::Malformed(format!(
            "hello: lowest version {min} above highest version {version}"
        )));
    }
    Ok(Hello {
        version,
        min_version,
        node_id: rest.node_id,
        purpose: rest.purpose,
    })
}

/// The server's side of the hello: decodes it and negotiates the highest version
/// both speak, `ours` being the server's range. A hello this build cannot read whose
/// fixed version is outside `ours` (a later layout) is a version mismatch, not a
/// malformed frame, so any two versions refuse each other clearly.
pub fn accept_hello(body: &[u8], ours: Versions) -> Result<(Hello, u16), ProtocolError> {
    let hello = match decode_hello(body) {
        Ok(h) => h,
        Err(e) => {
            if body.len() >= 6 && body[..4] == MAGIC {
                let theirs = u16::from_le_bytes([body[4], body[5]]);
                if !ours.contains(theirs) {
                    return Err(ProtocolError::VersionMismatch {
                        ours,
                        theirs: Versions::only(theirs),
                    });
                }
            }
            return Err(e);
        }
    };
    let version = ours.negotiate(hello.versions())?;
    Ok((hello, version))
}

/// Encodes the answer to a hello; the version only when the client sent a range.
pub fn encode_hello_ok(ok: &HelloOk) -> Vec<u8> {
    let mut body = encode_bincode(&HelloOkBody {
        node_id: ok.node_id,
    });
    if let Some(v) = ok.version {
        body.extend_from_slice(&v.to_le_bytes());
    }
    frame(Tag::HelloOk, &body)
}

pub fn decode_hello_ok(body: &[u8]) -> Result<HelloOk, ProtocolError> {
    let (ok, used): (HelloOkBody, usize) = decode_bincode_prefix(body, "hello-ok")?;
    let version = match &body[used..] {
        [] => None,
        [a, b] => Some(u16::from_le_bytes([*a, *b])),
        other => {
            return Err(ProtocolError::Malformed(format!(
                "hello-ok: {} trailing bytes",
                other.len()
            )))
        }
    };
    Ok(HelloOk {
        node_id: ok.node_id,
        version,
    })
}

/// The client's side of the answer: the version the connection speaks, given the
/// range `sent` in the hello. A server that names no version accepted the hello's
/// fixed one (the client's only version, or a server from before ranges).
pub fn negotiated_version(ok: &HelloOk, sent: Versions) -> Result<u16, ProtocolError> {
    match ok.version {
        None => Ok(sent.max),
        Some(v) if sent.contains(v) => Ok(v),
        Some(v) => Err(ProtocolError::Malformed(format!(
            "server chose protocol version {v}, outside the hello's {sent}"
        ))),
    }
}

/// Refuses a listed chunk on a connection whose version predates them: such a peer
/// would not know the flag, so a sender that sends one is broken.
pub fn check_chunk_version(h: &ChunkHeader, version: u16) -> Result<(), ProtocolError> {
    if h.listed && version < LISTED_CHUNKS_SINCE {
        return Err(ProtocolError::Malformed(format!(
            "listed chunk on a protocol version {version} connection (listed chunks need version {LISTED_CHUNKS_SINCE})"
        )));
    }
    Ok(())
}

/// A decoded request or message frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFrame {
    /// The caller's id for this logical request: every copy sent on another network
    /// carries the same one, so the receiver runs it once. 0 for one-way messages.
    pub id: u64,
    pub service: String,
    pub payload: Vec<u8>,
}

/// Body of a request or message frame: request id, service name length, name, payload.
pub fn encode_request(
    tag: Tag,
    id: u64,
    service: &str,
    payload: &[u8],
) -> Result<Vec<u8>, ProtocolError> {
    let name = service.as_bytes();
    if name.len() > usize::from(u8::MAX) {
        return Err(ProtocolError::Malformed(format!(
            "service name of {} bytes is too long",
            name.len()
        )));
    }
    let mut body = Vec::with_capacity(8 + 1 + name.len() + payload.len());
    body.extend_from_slice(&id.to_le_bytes());
    body.push(name.len() as u8);
    body.extend_from_slice(name);
    body.extend_from_slice(payload);
    Ok(frame(tag, &body))
}

/// Splits a request or message body into its parts.
pub fn decode_request(mut body: Vec<u8>) -> Result<RequestFrame, ProtocolError> {
    if body.len() < 9 {
        return Err(ProtocolError::Malformed(format!(
            "request of {} bytes is shorter than its header",
            body.len()
        )));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[..8]);
    let n = usize::from(body[8]);
    if body.len() < 9 + n {
        return Err(ProtocolError::Malformed("truncated service name".into()));
    }
    let service = std::str::from_utf8(&body[9..9 + n])
        .map_err(|_| ProtocolError::Malformed("service name is not UTF-8".into()))?
        .to_owned();
    body.drain(..9 + n);
    Ok(RequestFrame {
        id: u64::from_le_bytes(id),
        service,
        payload: body,
    })
}

pub fn encode_response(resp: &ResponseBody) -> Vec<u8> {
    let (status, bytes): (u8, &[u8]) = match resp {
        ResponseBody::Ok(b) => (0, b),
        ResponseBody::HandlerError(s) => (1, s.as_bytes()),
        ResponseBody::UnknownService(s) => (2, s.as_bytes()),
    };
    let mut body = Vec::with_capacity(1 + bytes.len());
    body.push(status);
    body.extend_from_slice(bytes);
    frame(Tag::Response, &body)
}

pub fn decode_response(mut body: Vec<u8>) -> Result<ResponseBody, ProtocolError> {
    let Some(&status) = body.first() else {
        return Err(ProtocolError::Malformed("empty response".into()));
    };
    body.remove(0);
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(match status {
        0 => ResponseBody::Ok(body),
        1 => ResponseBody::HandlerError(text(body)),
        2 => ResponseBody::UnknownService(text(body)),
        s => {
            return Err(ProtocolError::Malformed(format!(
                "unknown response status {s}"
            )))
        }
    })
}

pub fn encode_control(c: &Control) -> Vec<u8> {
    frame(Tag::Control, &encode_bincode(c))
}

pub fn decode_control(body: &[u8]) -> Result<Control, ProtocolError> {
    decode_bincode(body, "control")
}

/// Bytes of a chunk body before its page data: the fixed header and, for a listed
/// chunk, its offsets.
pub fn chunk_prefix_len(count: u32, listed: bool) -> usize {
    CHUNK_HEADER_LEN + if listed { 4 * count as usize } else { 0 }
}

/// Frame header, chunk header and (when `h.listed`) `offsets`, to be followed by the
/// page data (if not zero). `offsets` must hold `h.count` entries when listed.
pub fn encode_chunk_header(h: &ChunkHeader, offsets: &[u32]) -> Vec<u8> {
    debug_assert_eq!(h.listed, !offsets.is_empty());
    debug_assert!(!h.listed || offsets.len() == h.count as usize);
    let data_len = if h.zero {
        0
    } else {
        h.count as usize * PAGE_SIZE
    };
    let prefix = chunk_prefix_len(h.count, h.listed);
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + prefix);
    out.extend_from_slice(&frame_header(Tag::Chunk, prefix + data_len));
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.round.to_le_bytes());
    out.extend_from_slice(&h.first.to_le_bytes());
    out.extend_from_slice(&h.count.to_le_bytes());
    let flags = if h.zero { CHUNK_ZERO } else { 0 } | if h.listed { CHUNK_LISTED } else { 0 };
    out.push(flags);
    for off in offsets {
        out.extend_from_slice(&off.to_le_bytes());
    }
    out
}

/// Parses and validates a chunk body: header, offsets of a listed chunk, and the page
/// data (empty for a zero chunk).
pub fn decode_chunk(body: &[u8]) -> Result<ChunkBody<'_>, ProtocolError> {
    if body.len() < CHUNK_HEADER_LEN {
        return Err(ProtocolError::Malformed("truncated chunk header".into()));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let u32_at = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&body[i..i + 4]);
        u32::from_le_bytes(b)
    };
    let h = ChunkHeader {
        seq: u64_at(0),
        round: u32_at(8),
        first: u64_at(12),
        count: u32_at(20),
        zero: body[24] & CHUNK_ZERO != 0,
        listed: body[24] & CHUNK_LISTED != 0,
    };
    if body[24] & !(CHUNK_ZERO | CHUNK_LISTED) != 0 {
        return Err(ProtocolError::Malformed(format!(
            "chunk flags {}",
            body[24]
        )));
    }
    if h.count == 0 || h.count > MAX_CHUNK_PAGES {
        return Err(ProtocolError::Malformed(format!(
            "chunk of {} pages (allowed 1..={MAX_CHUNK_PAGES})",
            h.count
        )));
    }
    if h.round > MAX_ROUND || h.seq == 0 || h.seq > MAX_SEQ {
        return Err(ProtocolError::Malformed(format!(
            "chunk round {} / seq {} out of range",
            h.round, h.seq
        )));
    }
    if h.first.checked_add(u64::from(h.count)).is_none() {
        return Err(ProtocolError::Malformed(
            "chunk page range overflows".into(),
        ));
    }
    let prefix = chunk_prefix_len(h.count, h.listed);
    if body.len() < prefix {
        return Err(ProtocolError::Malformed(format!(
            "listed chunk of {} pages is missing its offsets",
            h.count
        )));
    }
    let offsets = if h.listed {
        let offsets: Vec<u32> = body[CHUNK_HEADER_LEN..prefix]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ProtocolError::Malformed(
                "chunk offsets must start at 0 and increase".into(),
            ));
        }
        let last = u64::from(offsets[offsets.len() - 1]);
        if h.first.checked_add(last + 1).is_none() {
            return Err(ProtocolError::Malformed(
                "chunk page range overflows".into(),
            ));
        }
        Some(offsets)
    } else {
        None
    };
    let data = &body[prefix..];
    let expected = if h.zero {
        0
    } else {
        h.count as usize * PAGE_SIZE
    };
    if data.len() != expected {
        return Err(ProtocolError::Malformed(format!(
            "chunk of {} pages carries {} bytes, expected {expected}",
            h.count,
            data.len()
        )));
    }
    Ok(ChunkBody {
        header: h,
        offsets,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        &frame[FRAME_HEADER_LEN..]
    }

    fn hello(version: u16, min_version: Option<u16>) -> Hello {
        Hello {
            version,
            min_version,
            node_id: 7,
            purpose: Purpose::PageStream {
                stream_id: 42,
                path: 1,
            },
        }
    }

    /// The hello a build from before version ranges sent: magic, its version, the rest.
    fn old_style_hello(version: u16) -> Vec<u8> {
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&version.to_le_bytes());
        body.extend_from_slice(&encode_bincode(&HelloRest {
            node_id: 7,
            purpose: Purpose::Rpc,
        }));
        frame(Tag::Hello, &body)
    }

    /// How a build from before version ranges read a hello: its one version, then
    /// the rest with no byte left over.
    fn old_style_decode(body: &[u8], version: u16) -> Result<HelloRest, ProtocolError> {
        let theirs = u16::from_le_bytes([body[4], body[5]]);
        if theirs != version {
            return Err(ProtocolError::VersionMismatch {
                ours: Versions::only(version),
                theirs: Versions::only(theirs),
            });
        }
        decode_bincode(&body[6..], "hello")
    }

    #[test]
    fn hello_round_trips_with_a_range_or_one_version() {
        let h = hello(3, Some(2));
        let f = encode_hello(&h);
        let hdr: [u8; 5] = f[..5].try_into().unwrap();
        assert_eq!(
            parse_frame_header(hdr, 1024).unwrap(),
            (Tag::Hello, f.len() - 5)
        );
        assert_eq!(decode_hello(body(&f)).unwrap(), h);
        assert_eq!(h.versions(), Versions { min: 2, max: 3 });
        // The fixed field is the highest version; the lowest comes last.
        assert_eq!(&body(&f)[4..6], &3u16.to_le_bytes());
        assert_eq!(&body(&f)[body(&f).len() - 2..], &2u16.to_le_bytes());

        // One version: no range on the wire, exactly what a build before ranges sent.
        let one = hello(2, Some(2));
        let f = encode_hello(&one);
        assert_eq!(decode_hello(body(&f)).unwrap(), hello(2, None));
        let mut old = old_style_hello(2);
        let plain = encode_hello(&Hello {
            purpose: Purpose::Rpc,
            ..one
        });
        assert_eq!(plain, old);

        // Garbage after the range, a range upside down, bytes that are no range.
        old.extend_from_slice(&[1]);
        assert!(matches!(
            decode_hello(body(&old)),
            Err(ProtocolError::Malformed(_))
        ));
        let mut f = encode_hello(&hello(3, Some(2)));
        let n = f.len();
        f[n - 2..].copy_from_slice(&4u16.to_le_bytes());
        assert!(matches!(
            decode_hello(body(&f)),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode_hello(b"HTTP/1.1"),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn versions_negotiate_to_the_highest_both_speak() {
        let ours = Versions { min: 2, max: 3 };
        let v = |min, max| Versions { min, max };
        assert_eq!(ours.negotiate(v(2, 3)), Ok(3));
        assert_eq!(ours.negotiate(v(2, 2)), Ok(2));
        assert_eq!(ours.negotiate(v(3, 4)), Ok(3));
        assert_eq!(ours.negotiate(v(1, 5)), Ok(3));
        assert_eq!(v(2, 2).negotiate(ours), Ok(2));
        // No overlap: refused, naming both ranges.
        let e = ours.negotiate(v(4, 4)).unwrap_err();
        assert_eq!(
            e,
            ProtocolError::VersionMismatch {
                ours,
                theirs: v(4, 4)
            }
        );
        assert_eq!(e.close_code(), CloseCode::VersionMismatch);
        assert_eq!(
            e.to_string(),
            "peer speaks protocol version 4, this node speaks version 2 to version 3: no version in common"
        );
        assert!(v(4, 5).negotiate(v(1, 3)).is_err());
    }

    #[test]
    fn the_server_negotiates_and_answers_in_the_form_the_client_knows() {
        let ours = Versions::THIS_BUILD;
        // A client speaking a range gets the version chosen.
        let (h, v) = accept_hello(body(&encode_hello(&hello(3, Some(2)))), ours).unwrap();
        assert_eq!(v, 3);
        let ok = HelloOk {
            node_id: 1,
            version: h.min_version.map(|_| v),
        };
        let got = decode_hello_ok(body(&encode_hello_ok(&ok))).unwrap();
        assert_eq!(got, ok);
        assert_eq!(negotiated_version(&got, h.versions()), Ok(3));
        // A server that speaks only 2 chooses 2 for the same client.
        let (_, v) =
            accept_hello(body(&encode_hello(&hello(3, Some(2)))), Versions::only(2)).unwrap();
        assert_eq!(v, 2);

        // An old-style client (one version, no range) gets the old answer: its node
        // id and nothing more, what a build before ranges decodes.
        let (h, v) = accept_hello(body(&old_style_hello(2)), ours).unwrap();
        assert_eq!((h.min_version, v), (None, 2));
        let ok = HelloOk {
            node_id: 1,
            version: h.min_version.map(|_| v),
        };
        let f = encode_hello_ok(&ok);
        let old: HelloOkBody = decode_bincode(body(&f), "hello-ok").unwrap();
        assert_eq!(old.node_id, 1);
        assert_eq!(negotiated_version(&ok, Versions::only(2)), Ok(2));
        // A server answering with a version the client never offered is broken.
        let bad = HelloOk {
            node_id: 1,
            version: Some(4),
        };
        assert!(negotiated_version(&bad, ours).is_err());

        // A client of a version this build no longer speaks: refused, both named.
        assert_eq!(
            accept_hello(body(&old_style_hello(1)), ours),
            Err(ProtocolError::VersionMismatch {
                ours,
                theirs: Versions::only(1)
            })
        );
    }

    #[test]
    fn builds_before_ranges_and_builds_after_this_one_refuse_or_agree_clearly() {
        // This build's range hello reaches a build that speaks only 2: the fixed
        // field says 3, so it refuses clearly before reading anything else.
        let f = encode_hello(&hello(VERSION, Some(MIN_VERSION)));
        assert!(matches!(
            old_style_decode(body(&f), 2),
            Err(ProtocolError::VersionMismatch { .. })
        ));
        // A node told to speak only 2 sends a hello that build reads as its own.
        let f = encode_hello(&hello(2, Some(2)));
        assert_eq!(old_style_decode(body(&f), 2).unwrap().node_id, 7);

        // A later build, whatever it puts after the fixed field, is refused by
        // version when it speaks nothing this build does...
        let mut future = encode_hello(&hello(9, Some(9)));
        future.truncate(FRAME_HEADER_LEN + 6);
        future.extend_from_slice(&[0xff; 40]);
        assert_eq!(
            accept_hello(body(&future), Versions::THIS_BUILD),
            Err(ProtocolError::VersionMismatch {
                ours: Versions::THIS_BUILD,
                theirs: Versions::only(9)
            })
        );
        // ...and agrees on this build's version when its range reaches down to it,
        // even with more after the range.
        let mut later = encode_hello(&hello(5, Some(3)));
        later.extend_from_slice(&[1, 2, 3]);
        let len = (later.len() - FRAME_HEADER_LEN) as u32;
        later[..4].copy_from_slice(&(len + 1).to_le_bytes());
        assert_eq!(
            accept_hello(body(&later), Versions::THIS_BUILD).unwrap().1,
            3
        );
    }

    #[test]
    fn listed_chunks_are_refused_below_their_version() {
        let h = ChunkHeader {
            seq: 1,
            round: 1,
            first: 0,
            count: 2,
            zero: true,
            listed: true,
        };
        assert!(check_chunk_version(&h, 2).is_err());
        assert!(check_chunk_version(&h, 3).is_ok());
        let plain = ChunkHeader { listed: false, ..h };
        assert!(check_chunk_version(&plain, 2).is_ok());
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_before_reading_the_body() {
        let mut hdr = frame_header(Tag::Chunk, 100);
        assert!(matches!(
            parse_frame_header(hdr, 50),
            Err(ProtocolError::FrameTooLarge { len: 101, max: 50 })
        ));
        hdr[4] = 99;
        assert_eq!(
            parse_frame_header(hdr, 1000),
            Err(ProtocolError::UnknownTag(99))
        );
        assert!(parse_frame_header([0, 0, 0, 0, 1], 1000).is_err());
    }

    #[test]
    fn chunk_round_trip_and_validation() {
        let h = ChunkHeader {
            seq: 5,
            round: 2,
            first: 100,
            count: 2,
            zero: false,
            listed: false,
        };
        let mut f = encode_chunk_header(&h, &[]);
        f.extend_from_slice(&[7u8; 2 * PAGE_SIZE]);
        let got = decode_chunk(body(&f)).unwrap();
        assert_eq!(got.header, h);
        assert_eq!(got.data.len(), 2 * PAGE_SIZE);
        assert_eq!(got.runs(), vec![(0, 100, 2)]);
        // Wrong payload length.
        assert!(decode_chunk(&body(&f)[..body(&f).len() - 1]).is_err());
        // Zero chunk carries no data.
        let z = ChunkHeader { zero: true, ..h };
        let f = encode_chunk_header(&z, &[]);
        let got = decode_chunk(body(&f)).unwrap();
        assert_eq!((got.header, got.data), (z, &[][..]));
        // Overflowing range.
        let bad = ChunkHeader {
            first: u64::MAX,
            zero: true,
            ..h
        };
        assert!(decode_chunk(body(&encode_chunk_header(&bad, &[]))).is_err());
        // Unknown flags.
        let mut f = encode_chunk_header(&z, &[]);
        let last = f.len() - 1;
        f[last] = 4;
        assert!(decode_chunk(body(&f)).is_err());
    }

    #[test]
    fn listed_chunks_carry_scattered_pages_as_runs() {
        let h = ChunkHeader {
            seq: 9,
            round: 3,
            first: 1000,
            count: 4,
            zero: false,
            listed: true,
        };
        let offsets = [0, 1, 7, 70_000];
        let mut f = encode_chunk_header(&h, &offsets);
        f.extend_from_slice(&[1u8; 4 * PAGE_SIZE]);
        let got = decode_chunk(body(&f)).unwrap();
        assert_eq!(got.header, h);
        assert_eq!(got.offsets.as_deref(), Some(&offsets[..]));
        assert_eq!(got.runs(), vec![(0, 1000, 2), (2, 1007, 1), (3, 71_000, 1)]);
        // Offsets out of order, not starting at 0, or missing: refused.
        for bad in [[0, 5, 5, 6], [1, 2, 3, 4], [0, 9, 8, 10]] {
            let mut f = encode_chunk_header(&h, &bad);
            f.extend_from_slice(&[1u8; 4 * PAGE_SIZE]);
            assert!(decode_chunk(body(&f)).is_err(), "{bad:?}");
        }
        let f = encode_chunk_header(&h, &offsets);
        assert!(decode_chunk(&body(&f)[..CHUNK_HEADER_LEN + 6]).is_err());
        // A listed zero chunk: offsets and no data.
        let z = ChunkHeader { zero: true, ..h };
        let f = encode_chunk_header(&z, &offsets);
        let got = decode_chunk(body(&f)).unwrap();
        assert_eq!((got.data.len(), got.runs().len()), (0, 3));
        // The last page may not overflow.
        let far = ChunkHeader {
            first: u64::MAX - 10,
            zero: true,
            ..h
        };
        assert!(decode_chunk(body(&encode_chunk_header(&far, &offsets))).is_err());
    }

    #[test]
    fn request_response_control_round_trip() {
        let f = encode_request(Tag::Request, 42, "raft", b"abc").unwrap();
        let r = decode_request(body(&f).to_vec()).unwrap();
        assert_eq!(
            (r.id, r.service.as_str(), r.payload.as_slice()),
            (42, "raft", &b"abc"[..])
        );
        assert!(
            decode_request(vec![1, 2, 3]).is_err(),
            "shorter than the header"
        );
        assert!(decode_request(vec![0, 0, 0, 0, 0, 0, 0, 0, 5, b'a']).is_err());
        for r in [
            ResponseBody::Ok(vec![1, 2]),
            ResponseBody::HandlerError("no".into()),
            ResponseBody::UnknownService("x".into()),
        ] {
            assert_eq!(
                decode_response(body(&encode_response(&r)).to_vec()).unwrap(),
                r
            );
        }
        let c = Control::Ack {
            seqs: vec![1, 2, 300],
        };
        assert_eq!(decode_control(body(&encode_control(&c))).unwrap(), c);
        assert!(decode_control(&[200, 1, 2]).is_err());
    }
}
