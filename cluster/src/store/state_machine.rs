//! openraft's state machine (`RaftStateMachine`): the [`ClusterState`] in memory, snapshots of
//! it on disk, and the stream of applied changes.
//!
//! The state lives in an `Arc` behind a lock shared with the node handle, so reads are a
//! pointer copy and never wait for the disk. Applying a command runs the pure
//! [`crate::apply::apply`]; the results of recent requests are remembered so a retried
//! request is answered, not applied twice.
//!
//! A snapshot is the serialized state plus the recent-request table (and, since the
//! second release, the revocation list after them); it is written durably
//! before openraft may purge the log it covers, and loaded back when the node restarts (the
//! log after it is then re-applied by openraft).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, Cursor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{encode, Db, KEY_SNAPSHOT};
use crate::apply::apply;
use crate::command::{ApplyResult, Command, Response};
use crate::model::{ClusterState, NodeId, Revocation};
use crate::raft_types::{
    Entry, LogId, Member, RequestId, StorageError, StoredMembership, TypeConfig,
};

/// How many recent request results are kept for answering retries. A client retries only
/// within its write timeout (5 s by default); at the few thousand commands per second the
/// store commits, this window covers that many times over.
pub const RECENT_REQUESTS: usize = 16_384;

/// One change the state machine applied, in log order.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The log index of the change (for a snapshot, the last index it covers).
    pub index: u64,
    pub change: Change,
}

/// What changed.
#[derive(Debug, Clone)]
pub enum Change {
    /// A command was applied, with its result (a refusal left the state unchanged).
    Command {
        command: Command,
        result: ApplyResult,
    },
    /// The Raft membership changed.
    Membership {
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    },
    /// The state was replaced by a snapshot from the leader: re-read it whole.
    Snapshot,
}

/// Counters about the store, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    pub commands_applied: u64,
    pub duplicates_answered: u64,
}

/// Results of recent requests, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RecentRequests {
    order: VecDeque<RequestId>,
    results: BTreeMap<RequestId, ApplyResult>,
}

impl RecentRequests {
    fn get(&self, id: &RequestId) -> Option<&ApplyResult> {
        self.results.get(id)
    }

    fn insert(&mut self, id: RequestId, result: ApplyResult) {
        if self.results.insert(id, result).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > RECENT_REQUESTS {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
    }
}

/// What a snapshot holds besides its metadata.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    state: ClusterState,
    recent: RecentRequests,
}

/// A snapshot as written to disk.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

#[derive(Default)]
struct Data {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: Arc<ClusterState>,
    recent: RecentRequests,
}

/// The part of the state machine the node handle shares.
pub(crate) struct Shared {
    data: RwLock<Data>,
    events: broadcast::Sender<Applied>,
    snapshots_built: AtomicU64,
    snapshots_installed: AtomicU64,
    commands_applied: AtomicU64,
    duplicates_answered: AtomicU64,
    snapshot_seq: AtomicU64,
}

impl Shared {
    /// The current state.
    pub(crate) fn state(&self) -> Arc<ClusterState> {
        self.data
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .clone()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.events.subscribe()
    }

    pub(crate) fn stats(&self) -> StoreStats {
        StoreStats {
            snapshots_built: self.snapshots_built.load(Ordering::Relaxed),
            snapshots_installed: self.snapshots_installed.load(Ordering::Relaxed),
            commands_applied: self.commands_applied.load(Ordering::Relaxed),
            duplicates_answered: self.duplicates_answered.load(Ordering::Relaxed),
        }
    }
}

/// The state machine openraft drives.
pub struct StateMachineStore {
    shared: Arc<Shared>,
    db: Db,
    current: Option<StoredSnapshot>,
}

fn sm_err(verb: ErrorVerb, e: io::Error) -> StorageError {
    StorageError::from_io_error(ErrorSubject::StateMachine, verb, e)
}

fn snap_err(verb: ErrorVerb, e: io::Error) -> StorageError {
    StorageError::from_io_error(ErrorSubject::Snapshot(None), verb, e)
}

impl StateMachineStore {
    /// Load the latest snapshot from the store, if any. `events` has room for this many
    /// applied changes a slow subscriber may fall behind by.
    pub fn open(db: Db, events: usize) -> io::Result<StateMachineStore> {
        let (tx, _) = broadcast::channel(events.max(1));
        let mut data = Data::default();
        let current: Option<StoredSnapshot> = db.get_meta(KEY_SNAPSHOT)?;
        if let Some(snap) = &current {
            let payload = decode_payload(&snap.data)?;
            data = Data {
                last_applied: snap.meta.last_log_id,
                membership: snap.meta.last_membership.clone(),
                state: Arc::new(payload.state),
                recent: payload.recent,
            };
        }
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                events: tx,
                snapshots_built: AtomicU64::new(0),
                snapshots_installed: AtomicU64::new(0),
                commands_applied: AtomicU64::new(0),
                duplicates_answered: AtomicU64::new(0),
                snapshot_seq: AtomicU64::new(0),
            }),
            db,
            current,
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn write_data(&self) -> std::sync::RwLockWriteGuard<'_, Data> {
        self.shared.data.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds a snapshot of the state as it is when building starts.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    db: Db,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, payload) = {
            let d = self.shared.data.read().unwrap_or_else(|e| e.into_inner());
            let seq = self.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
            let snapshot_id = match d.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, seq),
                None => format!("none-{seq}"),
            };
            let meta = SnapshotMeta {
                last_log_id: d.last_applied,
                last_membership: d.membership.clone(),
                snapshot_id,
            };
            // Serialize outside the lock would need a clone of the whole state; the state is
            // small (KiBs to MiBs) and encoding it is quick, so encode under the read lock.
            let payload = encode(&SnapshotPayloadRef {
                state: &d.state,
                recent: &d.recent,
                revoked: &d.state.revoked,
            })
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
            (meta, payload)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: payload.clone(),
        };
        self.db
            .put_meta_durable(KEY_SNAPSHOT, &stored)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.shared.snapshots_built.fetch_add(1, Ordering::Relaxed);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(payload)),
        })
    }
}

/// Borrowed form of [`SnapshotPayload`], to encode without cloning. The
/// revocation list follows the payload of the first release (see
/// [`decode_payload`]).
#[derive(Serialize)]
struct SnapshotPayloadRef<'a> {
    state: &'a ClusterState,
    recent: &'a RecentRequests,
    revoked: &'a BTreeMap<NodeId, Revocation>,
}

/// Reads a snapshot payload: the first release's `(state, recent)`, then,
/// when bytes follow (a snapshot of this build), the revocation list. The
/// first release's decoder ignores trailing bytes, so it reads this build's
/// snapshots too (without the list, which it cannot enforce).
fn decode_payload(bytes: &[u8]) -> io::Result<SnapshotPayload> {
    let invalid = |e: bincode::error::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
    let (mut payload, used): (SnapshotPayload, usize) =
        ferry_transport::codec::decode_standard(bytes, MAX_SNAPSHOT_VALUE).map_err(invalid)?;
    let rest = bytes.get(used..).unwrap_or_default();
    if !rest.is_empty() {
        let (revoked, _): (BTreeMap<NodeId, Revocation>, usize) =
            ferry_transport::codec::decode_standard(rest, MAX_SNAPSHOT_VALUE).map_err(invalid)?;
        payload.state.revoked = revoked;
    }
    Ok(payload)
}

/// Most bytes a snapshot payload may claim (as any stored value).
const MAX_SNAPSHOT_VALUE: usize = 64 << 20;

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = self.shared.data.read().unwrap_or_else(|e| e.into_inner());
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut events = Vec::new();
        let watched = self.shared.events.receiver_count() > 0;
        {
            let mut d = self.write_data();
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                let index = entry.log_id.index;
                match entry.payload {
                    EntryPayload::Blank => results.push(Ok(Response::Done)),
                    EntryPayload::Membership(m) => {
                        if watched {
                            events.push(Applied {
                                index,
                                change: Change::Membership {
                                    voters: m.voter_ids().collect(),
                                    learners: m.learner_ids().collect(),
                                },
                            });
                        }
                        d.membership = StoredMembership::new(Some(entry.log_id), m);
                        results.push(Ok(Response::Done));
                    }
                    EntryPayload::Normal(proposal) => {
                        if let Some(earlier) = d.recent.get(&proposal.id) {
                            self.shared
                                .duplicates_answered
                                .fetch_add(1, Ordering::Relaxed);
                            results.push(earlier.clone());
                            continue;
                        }
                        let command = watched.then(|| proposal.command.clone());
                        let result = apply(Arc::make_mut(&mut d.state), proposal.command);
                        d.recent.insert(proposal.id, result.clone());
                        self.shared.commands_applied.fetch_add(1, Ordering::Relaxed);
                        if let Some(command) = command {
                            events.push(Applied {
                                index,
                                change: Change::Command {
                                    command,
                                    result: result.clone(),
                                },
                            });
                        }
                        results.push(result);
                    }
                }
            }
        }
        for ev in events {
            // No subscriber left is not an error.
            let _ = self.shared.events.send(ev);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let payload = decode_payload(&data).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Durable before the state machine moves on: openraft purges the log it covers next.
        self.db
            .put_meta_durable(KEY_SNAPSHOT, &stored)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        {
            let mut d = self.write_data();
            d.last_applied = meta.last_log_id;
            d.membership = meta.last_membership.clone();
            d.state = Arc::new(payload.state);
            d.recent = payload.recent;
        }
        self.current = Some(stored);
        self.shared
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.shared.events.send(Applied {
            index: meta.last_log_id.map(|l| l.index).unwrap_or_default(),
            change: Change::Snapshot,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // A snapshot built since the last install is newer; the store always has the latest.
        let latest: Option<StoredSnapshot> = self
            .db
            .get_meta(KEY_SNAPSHOT)
            .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        if latest.is_some() {
            self.current = latest;
        }
        Ok(self.current.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The first release's payload, as it encoded it.
    #[derive(Serialize, Deserialize)]
    struct FirstRelease {
        state: ClusterState,
        recent: RecentRequests,
    }

    fn state_with_a_revocation() -> ClusterState {
        let mut state = ClusterState {
            next_tip_id: 9,
            ..Default::default()
        };
        state.revoked.insert(
            4,
            Revocation {
                name: "node-4".into(),
                at_ms: 1_700_000_000_000,
            },
        );
        state
    }

    #[test]
    fn snapshots_carry_the_revocation_list_and_read_one_version_back() {
        let state = state_with_a_revocation();
        let recent = RecentRequests::default();
        let now = encode(&SnapshotPayloadRef {
            state: &state,
            recent: &recent,
            revoked: &state.revoked,
        })
        .unwrap();
        let back = decode_payload(&now).unwrap();
        assert_eq!(back.state, state);

        // A snapshot of the first release: no list, read as an empty one.
        let old = encode(&FirstRelease {
            state: ClusterState {
                next_tip_id: 9,
                ..Default::default()
            },
            recent: RecentRequests::default(),
        })
        .unwrap();
        let back = decode_payload(&old).unwrap();
        assert_eq!(back.state.next_tip_id, 9);
        assert!(back.state.revoked.is_empty());

        // The first release's decoder (trailing bytes ignored) reads this
        // build's snapshot, all but the list.
        let read_by_old: FirstRelease = super::super::decode(&now).unwrap();
        assert_eq!(read_by_old.state.next_tip_id, 9);
    }
}
