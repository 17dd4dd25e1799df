//! QEMU's own live migration, as explicit steps Ferry's migration engine
//! drives, and its progress as plain data.
//!
//! QEMU migrates itself as one byte stream. The source `migrate`s to a Unix
//! socket Ferry listens on; Ferry carries the bytes to the target node and
//! into the socket the target listens on (`migrate-incoming`). The switchover
//! is fenced by Ferry: the source runs with `pause-before-switchover`, so it
//! stops at `pre-switchover` with the VM paused until
//! [`continue_switchover`](QemuVm::continue_switchover); the target runs with
//! `-S`, so it stays paused after the stream completes until
//! [`resume`](QemuVm::resume). Between the two sits Ferry's commit. An abort
//! before the commit is [`cancel_outgoing`](QemuVm::cancel_outgoing): the
//! source runs again.
//!
//! Every step has a deadline and fails with a [`QemuError`] saying which step,
//! and what QEMU said.

use super::{QemuError, QemuVm};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a wait re-asks QEMU when no event wakes it earlier.
const POLL: Duration = Duration::from_millis(50);
/// QEMU refuses `max-bandwidth` values this large and larger only near
/// `SIZE_MAX`; 1 TiB/s stands for "no cap".
const UNCAPPED: u64 = 1 << 40;

/// The migration settings Ferry's cluster settings map onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationSettings {
    /// The longest blackout QEMU plans for (`downtime-limit`).
    pub downtime_limit: Duration,
    /// Bytes per second (`max-bandwidth`); `None` for no cap.
    pub max_bandwidth: Option<u64>,
    /// Throttle the vCPUs when memory is dirtied faster than it is sent.
    pub auto_converge: bool,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            auto_converge: false,
        }
    }
}

/// Where a migration stands, in QEMU's words (`query-migrate`'s `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration was started.
    None,
    Setup,
    Active,
    /// The source is paused before sending its device state, waiting for
    /// `migrate-continue`.
    PreSwitchover,
    /// The source is sending its device state.
    Device,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    Other(String),
}

impl MigrationStatus {
    pub fn parse(text: &str) -> Self {
        match text {
            "none" => Self::None,
            "setup" => Self::Setup,
            "active" => Self::Active,
            "pre-switchover" => Self::PreSwitchover,
            "device" => Self::Device,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            other => Self::Other(other.into()),
        }
    }
}

/// One `query-migrate` answer, as plain numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationProgress {
    pub status: MigrationStatus,
    /// QEMU's dirty-sync count: how many passes over memory so far.
    pub round: u64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    /// The current send rate, bits per second.
    pub rate_bps: f64,
    /// QEMU's estimate of the blackout, were it to switch over now.
    pub expected_downtime: Option<Duration>,
    /// Time since the migration began (to the end, once completed).
    pub total_time: Option<Duration>,
    /// The blackout QEMU measured, once completed. With
    /// `pause-before-switchover` it includes the time the source waited at
    /// `pre-switchover` for Ferry's commit.
    pub downtime: Option<Duration>,
    /// QEMU's error, when failed.
    pub error: Option<String>,
}

impl MigrationProgress {
    /// Reads `query-migrate`'s answer; missing numbers are 0 (QEMU leaves
    /// out the `ram` block before the migration starts).
    pub fn from_query(answer: &Value) -> Result<Self, String> {
        let status = match answer.get("status") {
            None => MigrationStatus::None,
            Some(Value::String(s)) => MigrationStatus::parse(s),
            Some(other) => return Err(format!("query-migrate status is not a string: {other}")),
        };
        let ram = answer.get("ram");
        let ram_u64 = |key: &str| {
            ram.and_then(|r| r.get(key))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let millis = |key: &str| {
            answer
                .get(key)
                .and_then(Value::as_u64)
                .map(Duration::from_millis)
        };
        Ok(MigrationProgress {
            status,
            round: ram_u64("dirty-sync-count"),
            transferred_bytes: ram_u64("transferred"),
            remaining_bytes: ram_u64("remaining"),
            total_bytes: ram_u64("total"),
            rate_bps: ram
                .and_then(|r| r.get("mbps"))
                .and_then(Value::as_f64)
                .map_or(0.0, |mbps| mbps * 1e6),
            expected_downtime: millis("expected-downtime"),
            total_time: millis("total-time"),
            downtime: millis("downtime"),
            error: answer
                .get("error-desc")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }
}

/// The capabilities a source sets: Ferry fences the switchover, and wants
/// the events.
pub fn outgoing_capabilities(settings: &MigrationSettings) -> Value {
    let cap = |name: &str, state: bool| json!({"capability": name, "state": state});
    json!({"capabilities": [
        cap("pause-before-switchover", true),
        cap("events", true),
        cap("auto-converge", settings.auto_converge),
    ]})
}

pub fn outgoing_parameters(settings: &MigrationSettings) -> Value {
    let downtime_ms = u64::try_from(settings.downtime_limit.as_millis()).unwrap_or(u64::MAX);
    json!({
        // QEMU accepts 0..=2000000 ms.
        "downtime-limit": downtime_ms.min(2_000_000),
        "max-bandwidth": settings.max_bandwidth.unwrap_or(UNCAPPED).min(UNCAPPED),
    })
}

fn unix_uri(socket: &Path) -> String {
    format!("unix:{}", socket.display())
}

impl QemuVm {
    /// Source, step 1: capabilities (`pause-before-switchover`, `events`,
    /// auto-converge as asked) and parameters (downtime limit, bandwidth cap).
    /// Returns once QEMU accepted them.
    pub fn prepare_outgoing(&self, settings: &MigrationSettings) -> Result<(), QemuError> {
        self.qmp(
            "migrate-set-capabilities",
            Some(outgoing_capabilities(settings)),
        )?;
        self.qmp(
            "migrate-set-parameters",
            Some(outgoing_parameters(settings)),
        )?;
        Ok(())
    }

    /// Source, step 2: starts sending the stream to `socket`, a Unix socket
    /// Ferry listens on. Returns once QEMU started the migration (the VM keeps
    /// running while memory is copied).
    pub fn start_outgoing(&self, socket: &Path) -> Result<(), QemuError> {
        self.qmp("migrate", Some(json!({"uri": unix_uri(socket)})))?;
        Ok(())
    }

    /// Source, step 3: waits until the source stops at `pre-switchover` (the
    /// VM is paused there); fails if the migration fails or is cancelled
    /// first, or `timeout` passes.
    pub fn wait_pre_switchover(&self, timeout: Duration) -> Result<MigrationProgress, QemuError> {
        self.wait_migration("pre-switchover", timeout, |s| {
            *s == MigrationStatus::PreSwitchover
        })
    }

    /// Source, step 4, after Ferry's switchover commit: lets the source send
    /// its device state and finish. Returns once QEMU accepted it; see
    /// [`wait_outgoing_completed`](Self::wait_outgoing_completed).
    pub fn continue_switchover(&self) -> Result<(), QemuError> {
        self.qmp("migrate-continue", Some(json!({"state": "pre-switchover"})))?;
        Ok(())
    }

    /// Source: waits until the stream is sent whole (`completed`); the source
    /// stays paused (`postmigrate`) until it is destroyed.
    pub fn wait_outgoing_completed(
        &self,
        timeout: Duration,
    ) -> Result<MigrationProgress, QemuError> {
        self.wait_migration("completed", timeout, |s| *s == MigrationStatus::Completed)
    }

    /// Source, abort before the commit: cancels the migration and waits for
    /// `cancelled`, then makes sure the VM runs again. QEMU 7.2 resumes a
    /// source that was running when the migration began by itself, even from
    /// `pre-switchover`; `cont` is issued only if it did not. While the run
    /// lease does not hold the VM is paused instead and this fails with
    /// [`QemuError::Fenced`].
    pub fn cancel_outgoing(&self, timeout: Duration) -> Result<(), QemuError> {
        self.qmp("migrate_cancel", None)?;
        // A migration that failed on its own before the cancel is over, too.
        self.wait_migration("cancelled", timeout, |s| {
            matches!(
                s,
                MigrationStatus::Cancelled | MigrationStatus::Failed | MigrationStatus::None
            )
        })?;
        if !self.fence_holds() {
            // QEMU resumes a source that ran when the migration began: a VM
            // whose lease lapsed meanwhile must not run on.
            self.pause()?;
            return Err(QemuError::Fenced);
        }
        if !self.is_running()? {
            self.resume()?;
        }
        Ok(())
    }

    /// Target, step 1 (the VM was started with [`QemuVm::start_incoming`]):
    /// listens on `socket` for the stream. Returns once QEMU listens there.
    pub fn accept_incoming(&self, socket: &Path) -> Result<(), QemuError> {
        let events = json!({"capabilities": [{"capability": "events", "state": true}]});
        self.qmp("migrate-set-capabilities", Some(events))?;
        self.qmp("migrate-incoming", Some(json!({"uri": unix_uri(socket)})))?;
        Ok(())
    }

    /// Target, step 2: waits until the whole stream is loaded. The VM stays
    /// paused (`-S`) until [`resume`](Self::resume). A stream that breaks off
    /// makes the target QEMU exit: that is [`QemuError::Exited`].
    pub fn wait_incoming_completed(&self, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let progress = self.progress()?;
            if progress.status == MigrationStatus::Failed {
                return Err(migration_error(&progress));
            }
            // The target leaves `inmigrate` only once the stream is loaded.
            if self.run_status()? == "paused" {
                return Ok(());
            }
            self.wait_until(deadline, "the incoming migration to complete", timeout)?;
        }
    }

    /// How fast the guest dirties memory, bytes per second, measured by QEMU
    /// itself over `window` (rounded up to whole seconds, at least one:
    /// QEMU 7.2's `calc-dirty-rate` counts in seconds).
    pub fn dirty_rate(&self, window: Duration) -> Result<f64, QemuError> {
        let seconds = window.as_secs_f64().ceil().max(1.0) as u64;
        self.qmp("calc-dirty-rate", Some(json!({"calc-time": seconds})))?;
        let deadline =
            Instant::now() + Duration::from_secs(seconds) + self.config_command_timeout();
        loop {
            let answer = self.qmp("query-dirty-rate", None)?;
            if answer.get("status").and_then(Value::as_str) == Some("measured") {
                // QEMU reports MiB/s.
                let rate = answer
                    .get("dirty-rate")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| QemuError::Protocol(format!("query-dirty-rate: {answer}")))?;
                return Ok(rate * (1u64 << 20) as f64);
            }
            self.wait_until(
                deadline,
                "QEMU's dirty-rate measurement",
                Duration::from_secs(seconds),
            )?;
        }
    }

    /// Progress of the migration, from `query-migrate`.
    pub fn progress(&self) -> Result<MigrationProgress, QemuError> {
        let answer = self.qmp("query-migrate", None)?;
        MigrationProgress::from_query(&answer).map_err(QemuError::Protocol)
    }

    fn wait_migration(
        &self,
        what: &str,
        timeout: Duration,
        reached: impl Fn(&MigrationStatus) -> bool,
    ) -> Result<MigrationProgress, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let progress = self.progress()?;
            if reached(&progress.status) {
                return Ok(progress);
            }
            // Any end other than the one waited for is final: no waiting on.
            if matches!(
                progress.status,
                MigrationStatus::Failed
                    | MigrationStatus::Cancelled
                    | MigrationStatus::None
                    | MigrationStatus::Completed
            ) {
                return Err(migration_error(&progress));
            }
            self.wait_until(deadline, what, timeout)?;
        }
    }

    /// Waits for the next QMP event or [`POLL`], whichever is first; a
    /// timeout error once `deadline` has passed.
    fn wait_until(
        &self,
        deadline: Instant,
        what: &str,
        timeout: Duration,
    ) -> Result<(), QemuError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(QemuError::Timeout {
                waiting_for: what.into(),
                after: timeout,
            });
        }
        self.lock_qmp().wait_for_event((now + POLL).min(deadline))?;
        Ok(())
    }
}

fn migration_error(progress: &MigrationProgress) -> QemuError {
    QemuError::Migration {
        status: format!("{:?}", progress.status),
        error: progress.error.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_maps_to_rounds_bytes_rate_and_downtime() {
        let answer = json!({
            "status": "active",
            "expected-downtime": 12,
            "total-time": 400,
            "ram": {"dirty-sync-count": 3, "transferred": 1000, "remaining": 24,
                    "total": 268435456, "mbps": 812.5}
        });
        let p = MigrationProgress::from_query(&answer).unwrap();
        assert_eq!(p.status, MigrationStatus::Active);
        assert_eq!(p.round, 3);
        assert_eq!((p.transferred_bytes, p.remaining_bytes), (1000, 24));
        assert_eq!(p.total_bytes, 268435456);
        assert_eq!(p.rate_bps, 812.5e6);
        assert_eq!(p.expected_downtime, Some(Duration::from_millis(12)));
        assert_eq!(p.downtime, None);

        let none = MigrationProgress::from_query(&json!({})).unwrap();
        assert_eq!(none.status, MigrationStatus::None);
        assert_eq!(none.round, 0);
        let failed = MigrationProgress::from_query(
            &json!({"status": "failed", "error-desc": "broken pipe"}),
        )
        .unwrap();
        assert_eq!(failed.error.as_deref(), Some("broken pipe"));
        assert!(MigrationProgress::from_query(&json!({"status": 3})).is_err());
        assert_eq!(
            MigrationStatus::parse("postcopy-active"),
            MigrationStatus::Other("postcopy-active".into())
        );
    }

    #[test]
    fn settings_map_onto_qemu_capabilities_and_parameters() {
        let settings = MigrationSettings {
            downtime_limit: Duration::from_millis(50),
            max_bandwidth: Some(100 << 20),
            auto_converge: true,
        };
        let caps = outgoing_capabilities(&settings);
        let on = |name: &str| {
            caps["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["capability"] == name)
                .map(|c| c["state"] == true)
        };
        assert_eq!(on("pause-before-switchover"), Some(true));
        assert_eq!(on("events"), Some(true));
        assert_eq!(on("auto-converge"), Some(true));
        let params = outgoing_parameters(&settings);
        assert_eq!(params["downtime-limit"], 50);
        assert_eq!(params["max-bandwidth"], 100 << 20);
        let uncapped = outgoing_parameters(&MigrationSettings::default());
        assert_eq!(uncapped["max-bandwidth"], UNCAPPED);
        assert_eq!(uncapped["downtime-limit"], 300);
    }
}
