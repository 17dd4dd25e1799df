//! The cluster store's wire protocol: every message of the `"raft"` and `"cluster"` services.
//!
//! Each message is one version byte ([`WIRE_VERSION`]) followed by the bincode encoding of
//! the message. A node reads every version from [`MIN_WIRE_VERSION`] to [`WIRE_VERSION`]
//! (one version back, so a cluster upgrades node by node: ARCHITECTURE.md, *Upgrades*); a
//! peer speaking any other is refused with [`ProtocolError::Version`], never misread.
//! Decoding is bounded by [`MAX_MESSAGE`] so a malformed length cannot make a node
//! allocate without limit.
//!
//! These messages carry the store's commands (in `AppendEntries` and snapshots), so this
//! version is also the store commands' version.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::command::ApplyResult;
use crate::model::NodeId;
use crate::raft_types::{Member, Proposal, TypeConfig};

/// The protocol version this build writes, first byte of every message.
pub const WIRE_VERSION: u8 = 1;
/// The oldest version this build reads. There is no older version yet; the next change
/// of these messages or of the commands they carry keeps the decoder of the current one
/// and raises this to it.
pub const MIN_WIRE_VERSION: u8 = 1;

/// The largest message decoded, in bytes.
pub const MAX_MESSAGE: usize = 16 << 20;

/// A message could not be encoded or decoded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer speaks cluster protocol version {got}, this node reads {min} to {max}")]
    Version { got: u8, min: u8, max: u8 },
    #[error("empty message")]
    Empty,
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
}

/// Raft's own RPCs (service `"raft"`).
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// Answers to [`RaftRequest`]s.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
}

/// Client requests a node forwards to the leader (service `"cluster"`).
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Propose a command.
    Write(Proposal),
    /// Confirm leadership and name the log index a linearizable read must wait for.
    ReadIndex,
    /// Add a node as a learner, wait for it to catch up, then make it a voter.
    AddVoter { id: NodeId, member: Member },
    /// Add a node as a learner only.
    AddLearner { id: NodeId, member: Member },
    /// Remove a node from the membership.
    Remove { id: NodeId },
}

/// Answers to [`ClientRequest`]s.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientReply {
    /// The command was committed at `index` and applied with this result.
    Written { index: u64, result: ApplyResult },
    /// Reads after `index` is applied are linearizable.
    ReadIndex { index: Option<u64> },
    /// The membership change committed at `index`.
    MembershipChanged { index: u64 },
    /// This node is not the leader; try `leader` if known.
    NotLeader { leader: Option<NodeId> },
    /// The leader cannot serve now (lost quorum, shutting down); retry later.
    Unavailable(String),
    /// The request was refused for good.
    Failed(String),
}

/// Encode a message with its version byte.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = vec![WIRE_VERSION];
    bincode::serde::encode_into_std_write(msg, &mut out, bincode::config::standard())
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decode a message written by [`encode`], checking its version.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let (&version, body) = bytes.split_first().ok_or(ProtocolError::Empty)?;
    // One decoder per version read; version 1 is the only one so far.
    if !(MIN_WIRE_VERSION..=WIRE_VERSION).contains(&version) {
        return Err(ProtocolError::Version {
            got: version,
            min: MIN_WIRE_VERSION,
            max: WIRE_VERSION,
        });
    }
    let (msg, used) = ferry_transport::codec::decode_standard(body, MAX_MESSAGE)
        .map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(ProtocolError::Decode(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_mismatch_is_refused() {
        for bad in [WIRE_VERSION + 1, MIN_WIRE_VERSION - 1] {
            let mut bytes = encode(&ClientRequest::ReadIndex).unwrap();
            bytes[0] = bad;
            assert!(matches!(
                decode::<ClientRequest>(&bytes),
                Err(ProtocolError::Version { got, min, max })
                    if got == bad && min == MIN_WIRE_VERSION && max == WIRE_VERSION
            ));
        }
    }

    #[test]
    fn raft_errors_round_trip() {
        use openraft::error::{Fatal, SnapshotMismatch};
        use openraft::SnapshotSegmentId;
        use openraft::{ErrorSubject, ErrorVerb, StorageError};
        let storage = StorageError::<NodeId>::from_io_error(
            ErrorSubject::Logs,
            ErrorVerb::Write,
            std::io::Error::other("disk on fire"),
        );
        let reply = RaftReply::Vote(Err(RaftError::Fatal(Fatal::StorageError(storage))));
        let back: RaftReply = decode(&encode(&reply).unwrap()).unwrap();
        assert!(
            matches!(back, RaftReply::Vote(Err(RaftError::Fatal(Fatal::StorageError(e)))) if e.to_string().contains("disk on fire"))
        );
        let seg = |offset| SnapshotSegmentId {
            id: "s".into(),
            offset,
        };
        let reply = RaftReply::InstallSnapshot(Err(RaftError::APIError(
            InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                expect: seg(0),
                got: seg(5),
            }),
        )));
        let back: RaftReply = decode(&encode(&reply).unwrap()).unwrap();
        assert!(matches!(
            back,
            RaftReply::InstallSnapshot(Err(RaftError::APIError(_)))
        ));
        let reply = ClientReply::Written {
            index: 9,
            result: Err(crate::command::CommandError::StaleEpoch {
                expected: 1,
                current: 2,
            }),
        };
        let back: ClientReply = decode(&encode(&reply).unwrap()).unwrap();
        assert!(matches!(
            back,
            ClientReply::Written {
                index: 9,
                result: Err(crate::command::CommandError::StaleEpoch {
                    expected: 1,
                    current: 2
                })
            }
        ));
    }

    #[test]
    fn malformed_and_empty_messages_are_errors() {
        assert!(matches!(
            decode::<ClientRequest>(&[]),
            Err(ProtocolError::Empty)
        ));
        assert!(decode::<ClientRequest>(&[WIRE_VERSION, 0xff, 0xff, 0xff]).is_err());
        // A huge length prefix (AddVoter's address list) must not allocate: the limit refuses it.
        let mut huge = vec![WIRE_VERSION, 3, 1];
        huge.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode::<ClientRequest>(&huge).is_err());
        let ok = encode(&ClientRequest::Remove { id: 3 }).unwrap();
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(decode::<ClientRequest>(&trailing).is_err());
        assert!(matches!(
            decode::<ClientRequest>(&ok),
            Ok(ClientRequest::Remove { id: 3 })
        ));
    }
}
