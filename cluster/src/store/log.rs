//! openraft's log storage (`RaftLogStorage`) over the durable [`Db`].

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader};

use super::{Db, FlushCallback, KEY_COMMITTED, KEY_VOTE};
use crate::raft_types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The Raft log, vote and committed id of one node. Clones share the same store.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
}

fn store_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: io::Error) -> StorageError {
    StorageError::from_io_error(subject, verb, e)
}

impl LogStore {
    pub fn new(db: Db) -> LogStore {
        LogStore { db }
    }

    /// Append entries and run `done` once they are on disk. Openraft's `append` is this with
    /// its flush callback; it is public so that crash tests can drive the store directly.
    pub fn append_entries(&self, entries: Vec<Entry>, done: FlushCallback) -> io::Result<()> {
        self.db.append(entries, done)
    }

    /// Store the vote; returns once it is on disk.
    pub async fn store_vote(&self, vote: &Vote) -> io::Result<()> {
        self.db.put_meta_durable(KEY_VOTE, vote).await
    }

    /// The stored vote.
    pub fn load_vote(&self) -> io::Result<Option<Vote>> {
        self.db.get_meta(KEY_VOTE)
    }

    /// Entries with index in `[start, end)`.
    pub fn load_entries(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.db.entries(start, end)
    }

    /// The last purged and last present log ids.
    pub fn bounds(&self) -> io::Result<(Option<LogId>, Option<LogId>)> {
        self.db.log_bounds()
    }
}

fn range_to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = range_to_bounds(&range);
        self.db
            .entries(start, end)
            .map_err(|e| store_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let (last_purged_log_id, last_log_id) = self
            .db
            .log_bounds()
            .map_err(|e| store_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.store_vote(vote)
            .await
            .map_err(|e| store_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.load_vote()
            .map_err(|e| store_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.db
            .put_meta_lazy(KEY_COMMITTED, &committed)
            .map_err(|e| store_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> = self
            .db
            .get_meta(KEY_COMMITTED)
            .map_err(|e| store_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.db
            .append(entries, Box::new(move |r| callback.log_io_completed(r)))
            .map_err(|e| store_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .truncate(log_id.index)
            .await
            .map_err(|e| store_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .purge(log_id)
            .await
            .map_err(|e| store_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}
