//! Errors the transport reports, one enum per kind of caller: starting a node,
//! calling a peer, streaming pages. Each variant is a distinct, actionable kind;
//! the text says what happened and to whom.

use std::time::Duration;

use crate::protocol::CloseCode;
use crate::NodeId;

/// Creating or loading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("cannot read PEM: {0}")]
    Pem(String),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("certificate is not valid for node {node}: {reason}")]
    WrongNode { node: NodeId, reason: String },
}

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("a node needs at least one listen address")]
    NoAddresses,
    #[error("invalid network configuration: {0}")]
    Config(String),
}

/// A call or one-way message to a peer failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("node {peer} unreachable: {reason}")]
    Unreachable { peer: NodeId, reason: String },
    /// The peer's certificate is not from our cluster CA or not for the expected
    /// node, or the peer refused ours.
    #[error("peer identity refused: {0}")]
    PeerIdentity(String),
    /// The peer's handler ran and returned an error.
    #[error("remote handler failed: {0}")]
    Remote(String),
    #[error("peer has no service {0:?}")]
    UnknownService(String),
    /// The peer refused the request (for example an unknown page stream).
    #[error("refused by peer: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("frame too large: {0}")]
    FrameTooLarge(String),
    #[error("protocol version mismatch: {0}")]
    VersionMismatch(String),
    #[error("connection closed: {0}")]
    Closed(String),
    #[error("this node is shut down")]
    Shutdown,
}

impl RpcError {
    /// True when trying again (on this or another network) cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            RpcError::PeerIdentity(_)
                | RpcError::VersionMismatch(_)
                | RpcError::Refused(_)
                | RpcError::Shutdown
        )
    }

    /// The error a connection close code from the peer stands for.
    pub(crate) fn from_close(code: Option<CloseCode>, reason: String, peer: NodeId) -> RpcError {
        match code {
            Some(CloseCode::Protocol) => RpcError::Protocol(reason),
            Some(CloseCode::FrameTooLarge) => RpcError::FrameTooLarge(reason),
            Some(CloseCode::VersionMismatch) => RpcError::VersionMismatch(reason),
            Some(CloseCode::PeerIdentity) => RpcError::PeerIdentity(reason),
            Some(CloseCode::UnknownStream | CloseCode::TooManyConnections) => {
                RpcError::Refused(reason)
            }
            Some(CloseCode::Shutdown) => RpcError::Unreachable {
                peer,
                reason: format!("peer shut down: {reason}"),
            },
            _ => RpcError::Closed(reason),
        }
    }
}

/// A page stream failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageStreamError {
    #[error("every path to node {peer} has been dead for {after:?} (last error: {last_error})")]
    AllPathsDead {
        peer: NodeId,
        after: Duration,
        last_error: String,
    },
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("cancelled by peer: {0}")]
    PeerCancelled(String),
    /// The receiver's sink refused pages.
    #[error("receiver failed to apply pages: {0}")]
    SinkFailed(String),
    /// Connecting failed in a way retrying cannot fix (identity, version, unknown stream).
    #[error("cannot open path: {0}")]
    Connect(RpcError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("invalid use: {0}")]
    InvalidInput(String),
    #[error("page stream {0} is already registered")]
    AlreadyRegistered(u64),
    #[error("the node is shut down")]
    Shutdown,
}
