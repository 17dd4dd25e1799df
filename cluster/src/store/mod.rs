//! Durable storage of a node's Raft state in its data directory, on redb.
//!
//! One redb file, `raft.redb`, holds the log (`log` table: index → entry), and in `meta` the
//! vote, the last committed and last purged log ids and the latest state-machine snapshot.
//!
//! **Durability.** Every write goes through one writer thread, in the order it was asked for.
//! The thread drains whatever is queued and commits it as a single redb transaction with
//! `Durability::Immediate` (redb returns from `commit` only after fsync), then reports:
//! - a vote, a truncation, a purge or a snapshot is waited for: the call returns after the
//!   fsync;
//! - an append returns at once and fires openraft's flush callback only after the fsync,
//!   so Raft never counts an entry as stored before it is on disk. Appends queued while a
//!   commit is under way share the next fsync (group commit): under load one fsync carries
//!   many entries, and the leader's Raft core never blocks on the disk.
//! - the committed log id is written without its own fsync (`Durability::None`); it becomes
//!   durable with the next durable commit, and since transactions are applied in order a
//!   durable committed id never names an entry that is not durable. Losing it costs only a
//!   re-apply after restart.
//!
//! Entries appended but not yet committed to redb stay in an in-memory `pending` map that
//! readers consult under the same lock the writer takes to retire them, so a reader never
//! misses an entry that Raft has handed to the store.

mod log;
mod state_machine;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

pub use self::log::LogStore;
pub(crate) use self::state_machine::Shared as SmShared;
pub use self::state_machine::{
    Applied, Change, SnapshotBuilder, StateMachineStore, StoreStats, RECENT_REQUESTS,
};
use crate::raft_types::{Entry, LogId};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT: &str = "snapshot";

/// The file name of the store inside the data directory.
pub const DB_FILE: &str = "raft.redb";

/// Encode a value for the disk (bincode, standard configuration).
pub(crate) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(io::Error::other)
}

/// Most bytes one stored value may claim: log entries and votes are small, a
/// snapshot of the cluster's state a few megabytes.
const MAX_STORED_VALUE: usize = 64 << 20;

/// Decode a value written by [`encode`] (or a snapshot a peer sent), with length
/// claims bounded by the input (see `ferry_transport::codec::decode_standard`):
/// a corrupt value or a hostile snapshot cannot make the node allocate without
/// bound.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    ferry_transport::codec::decode_standard(bytes, MAX_STORED_VALUE)
        .map(|(v, _)| v)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn db_err(e: impl fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Called once an append is durable (or failed).
pub type FlushCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

enum WriteOp {
    Append {
        entries: Vec<(LogId, Vec<u8>)>,
        done: FlushCallback,
    },
    Meta {
        key: &'static str,
        value: Vec<u8>,
        reply: Option<oneshot::Sender<io::Result<()>>>,
    },
    Truncate {
        since: u64,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Purge {
        upto: u64,
        log_id: Vec<u8>,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

impl WriteOp {
    fn needs_fsync(&self) -> bool {
        !matches!(self, WriteOp::Meta { reply: None, .. })
    }
}

struct DbShared {
    db: Arc<Database>,
    closed: Arc<AtomicBool>,
    tx: mpsc::Sender<WriteOp>,
    /// Appended entries the writer has not yet committed, by index.
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
}

/// See [`Db::closed_signal`].
#[derive(Clone)]
pub struct ClosedSignal(Arc<AtomicBool>);

impl ClosedSignal {
    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A handle on a node's store; cheap to clone. The store closes when the last handle is gone.
#[derive(Clone)]
pub struct Db {
    shared: Arc<DbShared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Db {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> io::Result<Db> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join(DB_FILE)).map_err(db_err)?;
        {
            let mut txn = db.begin_write().map_err(db_err)?;
            txn.set_durability(Durability::Immediate);
            txn.open_table(LOG).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
            txn.commit().map_err(db_err)?;
        }
        let db = Arc::new(db);
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer_pending = pending.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let writer_closed = closed.clone();
        std::thread::Builder::new()
            .name("ferry-raft-store".into())
            .spawn(move || {
                writer_loop(&writer_db, writer_pending, rx);
                close_database(writer_db);
                writer_closed.store(true, Ordering::Release);
            })?;
        Ok(Db {
            shared: Arc::new(DbShared {
                db,
                closed,
                tx,
                pending,
            }),
        })
    }

    /// Tells when the store file is closed: every handle is gone and the writer has
    /// finished, so the data directory can be opened again.
    pub fn closed_signal(&self) -> ClosedSignal {
        ClosedSignal(self.shared.closed.clone())
    }

    fn send(&self, op: WriteOp) -> io::Result<()> {
        self.shared
            .tx
            .send(op)
            .map_err(|_| io::Error::other("store writer stopped"))
    }

    async fn send_and_wait(
        &self,
        make: impl FnOnce(oneshot::Sender<io::Result<()>>) -> WriteOp,
    ) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await
            .map_err(|_| io::Error::other("store writer stopped"))?
    }

    /// Append entries; `done` runs once they are durable. The entries are readable at once.
    pub fn append(&self, entries: Vec<Entry>, done: FlushCallback) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push((e.log_id, encode(e)?));
        }
        {
            let mut pending = lock(&self.shared.pending);
            for e in entries {
                pending.insert(e.log_id.index, e);
            }
        }
        self.send(WriteOp::Append {
            entries: encoded,
            done,
        })
    }

    /// Store a metadata value durably; returns after fsync.
    pub(crate) async fn put_meta_durable<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
    ) -> io::Result<()> {
        let value = encode(value)?;
        self.send_and_wait(|reply| WriteOp::Meta {
            key,
            value,
            reply: Some(reply),
        })
        .await
    }

    /// Store a metadata value without waiting; it becomes durable with the next durable write.
    pub(crate) fn put_meta_lazy<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
    ) -> io::Result<()> {
        let value = encode(value)?;
        self.send(WriteOp::Meta {
            key,
            value,
            reply: None,
        })
    }

    pub(crate) fn get_meta<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let txn = self.shared.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(META).map_err(db_err)?;
        match table.get(key).map_err(db_err)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Delete every entry with index ≥ `since`; returns after fsync.
    pub async fn truncate(&self, since: u64) -> io::Result<()> {
        {
            let mut pending = lock(&self.shared.pending);
            drop(pending.split_off(&since));
        }
        self.send_and_wait(|reply| WriteOp::Truncate { since, reply })
            .await
    }

    /// Delete every entry up to and including `upto`; returns after fsync.
    pub async fn purge(&self, upto: LogId) -> io::Result<()> {
        let log_id = encode(&upto)?;
        {
            let mut pending = lock(&self.shared.pending);
            let rest = pending.split_off(&(upto.index + 1));
            *pending = rest;
        }
        self.send_and_wait(|reply| WriteOp::Purge {
            upto: upto.index,
            log_id,
            reply,
        })
        .await
    }

    /// The entries with index in `[start, end)`, stored or pending, in index order.
    pub fn entries(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let pending = lock(&self.shared.pending);
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        let txn = self.shared.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LOG).map_err(db_err)?;
        for row in table.range(start..end).map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.insert(k.value(), decode(v.value())?);
        }
        for (i, e) in pending.range(start..end) {
            out.insert(*i, e.clone());
        }
        Ok(out.into_values().collect())
    }

    /// The last purged and the last present log ids.
    pub fn log_bounds(&self) -> io::Result<(Option<LogId>, Option<LogId>)> {
        let pending = lock(&self.shared.pending);
        let purged: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let txn = self.shared.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LOG).map_err(db_err)?;
        let stored: Option<LogId> = match table.last().map_err(db_err)? {
            Some((_, v)) => Some(decode::<Entry>(v.value())?.log_id),
            None => None,
        };
        let pending_last = pending.values().next_back().map(|e| e.log_id);
        let last = [purged, stored, pending_last]
            .into_iter()
            .flatten()
            .max_by_key(|l| l.index);
        Ok((purged, last))
    }
}

/// Commits queued writes, in order, until every handle is gone.
fn writer_loop(
    db: &Database,
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
    rx: mpsc::Receiver<WriteOp>,
) {
    const MAX_BATCH: usize = 1024;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(WriteOp::needs_fsync);
        let result = commit_batch(db, &batch, durable);
        // Retire the appended entries from `pending` (readers now find them in redb).
        if result.is_ok() {
            let mut p = lock(&pending);
            for op in &batch {
                if let WriteOp::Append { entries, .. } = op {
                    for (log_id, _) in entries {
                        if p.get(&log_id.index).is_some_and(|e| e.log_id == *log_id) {
                            p.remove(&log_id.index);
                        }
                    }
                }
            }
        }
        for op in batch {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            match op {
                WriteOp::Append { done, .. } => done(r),
                WriteOp::Meta { reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                WriteOp::Truncate { reply, .. } | WriteOp::Purge { reply, .. } => {
                    let _ = reply.send(r);
                }
            }
        }
    }
}

/// Drop the database once this is the last reference to it (so "closed" means the file
/// lock is released); give up waiting after 10 s.
fn close_database(mut db: Arc<Database>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => return drop(db),
            Err(shared) if std::time::Instant::now() < deadline => {
                db = shared;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
}

fn commit_batch(db: &Database, batch: &[WriteOp], durable: bool) -> io::Result<()> {
    let mut txn = db.begin_write().map_err(db_err)?;
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    });
    {
        let mut log = txn.open_table(LOG).map_err(db_err)?;
        let mut meta = txn.open_table(META).map_err(db_err)?;
        for op in batch {
            match op {
                WriteOp::Append { entries, .. } => {
                    for (log_id, bytes) in entries {
                        log.insert(log_id.index, bytes.as_slice()).map_err(db_err)?;
                    }
                }
                WriteOp::Meta { key, value, .. } => {
                    meta.insert(*key, value.as_slice()).map_err(db_err)?;
                }
                WriteOp::Truncate { since, .. } => {
                    log.retain_in(*since.., |_, _| false).map_err(db_err)?;
                }
                WriteOp::Purge { upto, log_id, .. } => {
                    meta.insert(KEY_PURGED, log_id.as_slice()).map_err(db_err)?;
                    log.retain_in(..=*upto, |_, _| false).map_err(db_err)?;
                }
            }
        }
    }
    txn.commit().map_err(db_err)
}
