//! The durable log store under SIGKILL: a child process appends entries and saves votes in a
//! loop, printing each one the store acknowledged (flush callback fired, vote call
//! returned); the parent kills it mid-append, reopens the store and checks that every
//! acknowledged entry and vote is there, intact, and that the log has no hole.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TempDir;
use ferry_cluster::command::Command;
use ferry_cluster::raft_types::{Entry, Proposal, RequestId, Vote};
use ferry_cluster::store::{Db, LogStore};
use openraft::{CommittedLeaderId, EntryPayload, LogId};

const CHILD_ENV: &str = "FERRY_LOG_CRASH_CHILD_DIR";

/// The entry the child writes at `index`: its content is a function of the index, so the
/// parent can check it byte for byte.
fn entry(index: u64, term: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Proposal {
            id: RequestId {
                origin: 1,
                session: 7,
                seq: index,
            },
            command: Command::RemoveNetwork {
                name: format!("network-{index}-{}", "x".repeat((index % 97) as usize)),
            },
        }),
    }
}

/// Child side: append forever (until killed), many appends in flight at once.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // Only runs when re-executed by the parent below.
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = LogStore::new(Db::open(std::path::Path::new(&dir)).unwrap());
        let (_, last) = store.bounds().unwrap();
        let mut next = last.map_or(1, |l| l.index + 1);
        let mut term = store.load_vote().unwrap().map_or(1, |v| v.leader_id().term);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
        let mut n = 0u64;
        loop {
            // Batches of 1..=16 entries, like a leader's appends and a follower's batches.
            let batch = 1 + (n % 16);
            let entries: Vec<Entry> = (next..next + batch).map(|i| entry(i, term)).collect();
            let last_index = next + batch - 1;
            next += batch;
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            store
                .append_entries(
                    entries,
                    Box::new(move |r| {
                        r.unwrap();
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ack {last_index}").unwrap();
                        out.flush().unwrap();
                        drop(permit);
                    }),
                )
                .unwrap();
            n += 1;
            if n % 40 == 0 {
                term += 1;
                store.store_vote(&Vote::new(term, 1)).await.unwrap();
                let mut out = std::io::stdout().lock();
                writeln!(out, "vote {term}").unwrap();
                out.flush().unwrap();
            }
        }
    });
}

#[test]
fn acknowledged_appends_and_votes_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = TempDir::new("log-crash");
    let exe = std::env::current_exe().unwrap();
    let mut acked_total = 0;
    // Kill after different amounts of work, resuming the same store each time.
    for (trial, kill_after) in [37u64, 400, 1500, 5].into_iter().enumerate() {
        let mut child = Process::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut max_ack, mut max_vote, mut acks) = (0u64, 0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks < kill_after {
            assert!(Instant::now() < deadline, "child made no progress");
            let Some(line) = lines.next() else {
                panic!("child exited early: {:?}", child.wait())
            };
            let line = line.unwrap();
            if let Some(i) = line.strip_prefix("ack ") {
                max_ack = max_ack.max(i.parse().unwrap());
                acks += 1;
            } else if let Some(t) = line.strip_prefix("vote ") {
                max_vote = max_vote.max(t.parse().unwrap());
            }
        }
        // SIGKILL while appends are in flight.
        child.kill().unwrap();
        // Anything the child acknowledged before dying may still be in the pipe.
        for line in lines.map_while(Result::ok) {
            if let Some(i) = line.strip_prefix("ack ") {
                max_ack = max_ack.max(i.parse().unwrap());
            } else if let Some(t) = line.strip_prefix("vote ") {
                max_vote = max_vote.max(t.parse().unwrap());
            }
        }
        child.wait().unwrap();

        let db = Db::open(&dir.0).unwrap();
        let closed = db.closed_signal();
        let store = LogStore::new(db);
        let (purged, last) = store.bounds().unwrap();
        assert_eq!(purged, None);
        let last = last.unwrap().index;
        assert!(
            last >= max_ack,
            "trial {trial}: entry {max_ack} was acknowledged, the log ends at {last}"
        );
        // Every entry up to the end is there and intact: the durable log is a prefix.
        let entries = store.load_entries(1, last + 1).unwrap();
        assert_eq!(
            entries.len() as u64,
            last,
            "trial {trial}: a hole in the log"
        );
        for (i, e) in entries.iter().enumerate() {
            let index = i as u64 + 1;
            assert_eq!(e.log_id.index, index);
            assert_eq!(
                e.payload,
                entry(index, e.log_id.leader_id.term).payload,
                "entry {index} corrupted"
            );
        }
        let vote = store.load_vote().unwrap();
        if max_vote > 0 {
            let term = vote.unwrap().leader_id().term;
            assert!(
                term >= max_vote,
                "trial {trial}: vote {max_vote} acknowledged, {term} stored"
            );
        }
        println!(
            "trial {trial}: killed after {acks} acks; acknowledged up to {max_ack}, stored up to {last}, vote {vote:?}"
        );
        acked_total += acks;
        // Close the store before the next child opens the file.
        drop(store);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !closed.is_closed() {
            assert!(Instant::now() < deadline, "store did not close");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(acked_total > 1900);
}
