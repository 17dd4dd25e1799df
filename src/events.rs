//! The event hub of one node: migration progress and reports, whether the
//! migration runs here or elsewhere, and the store's applied changes.
//!
//! A migration's progress exists only on its source node (the job runs
//! there). So that the API of any node can stream any migration, each node
//! relays the progress of the jobs it runs to its peers (one-way messages over
//! the transport, see [`crate::peer`]); a node publishes relayed events but
//! never relays them again. The hub also keeps the rounds of recent migrations,
//! so a dashboard opened mid-move can draw the rounds it missed.

use crate::views::{ProgressView, ReportView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// Migrations whose rounds the hub remembers.
const TRACES_KEPT: usize = 64;
/// Progress events kept per migration. Of the mid-round samples (several a
/// second) only the newest is kept, until the next event takes its place: a
/// trace is the rounds' ends and the phases, plus where the move is now.
const EVENTS_PER_TRACE: usize = 256;

/// What the event stream carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A migration made progress (its source node reports it).
    Progress(ProgressView),
    /// A migration completed; what its source measured.
    Report(ReportView),
    /// The cluster store applied a change (on this node's replica).
    Change {
        command: String,
        ok: bool,
        error: Option<String>,
    },
}

impl Event {
    /// Whether the event came from a local job and should go to the peers.
    pub fn is_relayed(&self) -> bool {
        matches!(self, Event::Progress(_) | Event::Report(_))
    }

    /// The SSE event name.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Progress(_) => "progress",
            Event::Report(_) => "report",
            Event::Change { .. } => "change",
        }
    }

    pub fn migration(&self) -> Option<u64> {
        match self {
            Event::Progress(p) => Some(p.migration),
            Event::Report(r) => Some(r.migration),
            Event::Change { .. } => None,
        }
    }
}

#[derive(Default, Clone)]
struct Trace {
    events: Vec<ProgressView>,
    report: Option<ReportView>,
}

/// Counters the metrics endpoint shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubCounters {
    pub reports: u64,
    pub bytes_migrated: u64,
    pub blackout_ms_total: f64,
    pub blackout_ms_max: f64,
}

pub struct EventHub {
    tx: broadcast::Sender<Event>,
    traces: Mutex<BTreeMap<u64, Trace>>,
    counters: Mutex<HubCounters>,
    /// The bandwidth the most recent copy round measured.
    last_bandwidth: Mutex<Option<f64>>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            tx: broadcast::channel(1024).0,
            traces: Mutex::new(BTreeMap::new()),
            counters: Mutex::new(HubCounters::default()),
            last_bandwidth: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventHub {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Records and broadcasts an event.
    pub fn publish(&self, event: Event) {
        match &event {
            Event::Progress(p) => {
                if p.phase == "copying" && p.bandwidth > 0.0 {
                    *lock(&self.last_bandwidth) = Some(p.bandwidth);
                }
                let mut traces = lock(&self.traces);
                let trace = traces.entry(p.migration).or_default();
                if trace.events.last().is_some_and(|last| last.mid_round) {
                    trace.events.pop();
                }
                if trace.events.len() < EVENTS_PER_TRACE {
                    trace.events.push(p.clone());
                }
                while traces.len() > TRACES_KEPT {
                    traces.pop_first();
                }
            }
            Event::Report(r) => {
                {
                    let mut c = lock(&self.counters);
                    c.reports += 1;
                    c.bytes_migrated += r.bytes;
                    c.blackout_ms_total += r.blackout_ms;
                    c.blackout_ms_max = c.blackout_ms_max.max(r.blackout_ms);
                }
                let mut traces = lock(&self.traces);
                traces.entry(r.migration).or_default().report = Some(r.clone());
                while traces.len() > TRACES_KEPT {
                    traces.pop_first();
                }
            }
            Event::Change { .. } => {}
        }
        let _ = self.tx.send(event);
    }

    /// The progress events and report this node saw of `migration`.
    pub fn trace(&self, migration: u64) -> (Vec<ProgressView>, Option<ReportView>) {
        lock(&self.traces)
            .get(&migration)
            .map(|t| (t.events.clone(), t.report.clone()))
            .unwrap_or_default()
    }

    pub fn counters(&self) -> HubCounters {
        *lock(&self.counters)
    }

    pub fn last_bandwidth(&self) -> Option<f64> {
        *lock(&self.last_bandwidth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(phase: &str, round: u32, mid_round: bool, at_ms: u64) -> Event {
        Event::Progress(ProgressView {
            migration: 1,
            vm: "web-1".into(),
            node: 1,
            phase: phase.into(),
            round,
            bytes_sent: at_ms,
            remaining_pages: 0,
            bytes_remaining: 0,
            dirty_rate: 0.0,
            bandwidth: 0.0,
            expected_downtime_ms: 0.0,
            throttle: 0.0,
            mid_round,
            round_bytes_sent: 0,
            rate: 0.0,
            eta_ms: None,
            percent: 0.0,
            at_ms,
        })
    }

    #[test]
    fn a_trace_keeps_the_ends_of_rounds_and_only_the_newest_sample() {
        let hub = EventHub::default();
        hub.publish(event("preparing", 0, false, 0));
        for at in 1..=20 {
            hub.publish(event("copying", 0, true, at));
        }
        hub.publish(event("copying", 0, false, 21));
        hub.publish(event("copying", 1, true, 22));
        hub.publish(event("copying", 1, true, 23));
        let (events, _) = hub.trace(1);
        let kept: Vec<(&str, bool, u64)> = events
            .iter()
            .map(|p| (p.phase.as_str(), p.mid_round, p.at_ms))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("preparing", false, 0),
                ("copying", false, 21),
                ("copying", true, 23)
            ],
            "the newest sample shows where round 1 is"
        );
        hub.publish(event("blackout", 1, false, 24));
        let (events, _) = hub.trace(1);
        assert_eq!(events.len(), 3);
        assert_eq!(events[2].phase, "blackout");
    }
}
