//! The source job for a guest that migrates itself as one byte stream (QEMU):
//! the guest runs its own rounds and writes its stream into a local socket;
//! this job carries it to the target over the multipath byte stream and keeps
//! the parts that make a move safe and readable.
//!
//! - The guest pauses before its last state (`PreSwitchover`): that is where
//!   the blackout starts. It then sends the rest and stops (`Completed`).
//! - The target loads the stream into a guest that stays paused; only the
//!   store's switchover commit lets it run, as for every other guest.
//! - Anything that fails before the commit cancels the guest's migration and
//!   resumes it here (`abort`), which is allowed because this job never
//!   proposed the switchover; the commit is proposed only after the guest
//!   reported `Completed`, from which it never resumes by itself.
//! - Progress comes from the guest's own figures (round = its dirty-sync
//!   count), polled at least every [`POLL`].

use super::PAGE_SIZE;
use super::{Failure, Job, MigrationReport, Phase, RoundReport, BLACKOUT_HEDGE, BLACKOUT_SLACK};
use crate::history::{GuestPoint, HistoryEvent};
use crate::migration::protocol::{Reply, Request};
use crate::node::lock;
use ferry_cluster::model::MigrationPhase;
use ferry_transport::{ByteSenderStats, ByteStreamError, ByteStreamSender, CallOptions};
use ferry_vmm::{Guest, StreamGuest, StreamProgress, StreamSettings, StreamStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How often the guest's progress is reported while it copies (it is waited
/// on between, so a pause is seen at once).
const POLL: Duration = Duration::from_millis(100);
/// How long the guest may take to connect to the job's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target may take, after the last byte, to load the stream.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

impl Job {
    /// Runs a stream guest's move from `Prepare` to the target running it.
    pub(super) async fn stream_and_switch(
        &self,
        paths: &[std::net::SocketAddr],
        started: Instant,
    ) -> Result<MigrationReport, Failure> {
        let not_paused = |reason: String| Failure::BeforeCommit {
            reason,
            paused: false,
        };
        let sender = self.prepare_stream(paths).await.map_err(not_paused)?;
        let canceller = sender.canceller();
        let socket = stream_of(&self.guest)
            .map_err(not_paused)?
            .run_dir()
            .join(format!("out-{}.sock", self.migration));
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| not_paused(format!("listening on {}: {e}", socket.display())))?;
        let settings = StreamSettings {
            downtime_limit: self.config.downtime_limit,
            max_bandwidth: self
                .node
                .cluster
                .read()
                .settings
                .bandwidth_cap_bytes_per_sec,
            auto_converge: self.config.auto_converge.enabled,
        };
        let outcome = self
            .carry(sender, &listener, &socket, &settings, started)
            .await;
        let _ = std::fs::remove_file(&socket);
        if let Err(failure) = &outcome {
            if !matches!(failure, Failure::Superseded) {
                // Nothing committed: stop the guest's migration (it may have
                // paused itself for it); `abort` resumes it if paused.
                canceller.cancel("the move was abandoned");
                let guest = self.guest.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    stream_of(&guest).and_then(|s| s.cancel_outgoing().map_err(|e| e.to_string()))
                })
                .await;
            }
        }
        outcome.map_err(|failure| match failure {
            Failure::BeforeCommit { reason, .. } => Failure::BeforeCommit {
                reason,
                paused: self.guest.is_paused(),
            },
            other => other,
        })
    }

    /// `Prepare` (the target starts its guest waiting for a stream), then the
    /// byte stream to it.
    async fn prepare_stream(
        &self,
        paths: &[std::net::SocketAddr],
    ) -> Result<ByteStreamSender, String> {
        self.ask_prepare().await?;
        self.node
            .rpc
            .open_byte_stream(self.req.target, paths, self.migration)
            .await
            .map_err(|e| format!("byte stream: {e}"))
    }

    async fn carry(
        &self,
        sender: ByteStreamSender,
        listener: &tokio::net::UnixListener,
        socket: &std::path::Path,
        settings: &StreamSettings,
        started: Instant,
    ) -> Result<MigrationReport, Failure> {
        let fail = |reason: String| Failure::BeforeCommit {
            reason,
            paused: false,
        };
        {
            let (guest, socket, settings) =
                (self.guest.clone(), socket.to_owned(), settings.clone());
            blocking(move || {
                stream_of(&guest)?
                    .start_outgoing(&socket, &settings)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(fail)?;
        }
        let (connection, _) = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept())
            .await
            .map_err(|_| fail("the guest did not connect to the migration socket".into()))?
            .map_err(|e| fail(format!("accepting the guest's stream: {e}")))?;
        let hedge = sender.canceller();
        let mut pump: JoinHandle<Result<ByteSenderStats, ByteStreamError>> =
            tokio::spawn(async move {
                let mut connection = connection;
                sender.pump_from(&mut connection).await
            });

        // Rounds: the guest copies while it runs, until it pauses.
        let mut last = self.poll_progress().await.map_err(fail)?;
        let mut recorded_round = u32::MAX;
        loop {
            if self.cancelled() {
                return Err(Failure::Cancelled { paused: false });
            }
            match &last.status {
                StreamStatus::PreSwitchover | StreamStatus::Completed => break,
                StreamStatus::Failed(e) => {
                    return Err(fail(format!("the guest's migration failed: {e}")))
                }
                StreamStatus::Cancelled => {
                    return Err(fail("the guest's migration was cancelled".into()))
                }
                StreamStatus::None | StreamStatus::Active => {}
            }
            if pump.is_finished() {
                let reason = match (&mut pump).await {
                    Ok(Err(e)) => format!("the byte stream failed: {e}"),
                    _ => "the guest's stream ended before its last state".into(),
                };
                return Err(fail(reason));
            }
            self.emit_stream(Phase::Copying, &last, started);
            if round_of(&last) != recorded_round {
                recorded_round = round_of(&last);
                self.record_phase(MigrationPhase::Copying {
                    round: recorded_round,
                });
            }
            // Returns as soon as the guest pauses: the blackout starts there.
            let guest = self.guest.clone();
            last = blocking(move || {
                stream_of(&guest)?
                    .wait_outgoing(POLL)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(fail)?;
        }

        // Blackout: the guest is paused at its switchover point. What is left
        // of its stream goes on every path, so a network that died silently
        // costs the blackout nothing instead of its dead-path deadline.
        let blackout = Instant::now();
        hedge.hedge(true);
        let round = round_of(&last);
        self.node.record(|| HistoryEvent::SourcePaused {
            migration: self.migration,
            vm: self.req.vm.clone(),
            node: self.node.id,
        });
        self.node.observe(
            GuestPoint::Paused,
            self.migration,
            &self.req.vm,
            self.guest.as_ref(),
        );
        self.record_phase(MigrationPhase::StopAndCopy);
        self.emit_stream(Phase::Blackout, &last, started);
        let paused = |reason: String| Failure::BeforeCommit {
            reason,
            paused: true,
        };
        let budget = self
            .config
            .downtime_limit
            .max(last.expected_downtime.unwrap_or_default())
            + BLACKOUT_SLACK;
        let deadline = blackout + budget;
        if last.status == StreamStatus::PreSwitchover {
            let guest = self.guest.clone();
            blocking(move || {
                stream_of(&guest)?
                    .continue_switchover()
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(paused)?;
        }
        let stats = match tokio::time::timeout_at(deadline.into(), &mut pump).await {
            Err(_) => {
                pump.abort();
                return Err(paused(format!(
                    "the blackout ran past its budget of {budget:?} before the stream ended"
                )));
            }
            Ok(Err(e)) => return Err(paused(format!("the stream's pump stopped: {e}"))),
            Ok(Ok(Err(e))) => return Err(paused(format!("the byte stream failed: {e}"))),
            Ok(Ok(Ok(stats))) => stats,
        };
        let done = self.poll_progress().await.map_err(paused)?;
        if done.status != StreamStatus::Completed {
            return Err(paused(format!(
                "the stream ended but the guest says {:?}",
                done.status
            )));
        }
        if self.cancelled() {
            return Err(Failure::Cancelled { paused: true });
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(LOAD_TIMEOUT);
        match self
            .call_with(
                &Request::Complete {
                    migration: self.migration,
                    device_state: Vec::new(),
                    digest: None,
                    last_round: round,
                },
                CallOptions::new(left).hedge_after(BLACKOUT_HEDGE),
            )
            .await
            .map_err(paused)?
        {
            Reply::Verified { .. } => {}
            Reply::Refused { reason } => {
                return Err(paused(format!(
                    "target could not load the stream: {reason}"
                )))
            }
            other => return Err(paused(format!("unexpected reply {other:?}"))),
        }
        if self.cancelled() {
            return Err(Failure::Cancelled { paused: true });
        }
        self.emit_stream(Phase::SwitchingOver, &done, started);
        // From here on as for every guest: the store decides.
        let epoch = self.switch_over().await?;
        let blackout = blackout.elapsed();
        let total = started.elapsed();
        self.release_source_copy();
        self.emit_stream(Phase::Completed, &done, started);
        let (paths, networks_skipped) = lock(&self.paths).clone();
        Ok(MigrationReport {
            migration: self.migration,
            vm: self.req.vm.clone(),
            source: self.node.id,
            target: self.req.target,
            trigger: self.req.trigger,
            // The guest ran its rounds; it reports only totals.
            rounds: vec![RoundReport {
                round,
                pages_sent: done.transferred / PAGE_SIZE as u64,
                zero_pages: 0,
                pages_dirtied: 0,
                bytes: stats.bytes,
                elapsed: total.saturating_sub(blackout),
                throttle: 0.0,
            }],
            final_pages: 0,
            bytes: stats.bytes,
            total,
            blackout,
            epoch,
            paths,
            networks_skipped,
            offload: Default::default(),
            storage: self.storage_report(),
        })
    }

    async fn poll_progress(&self) -> Result<StreamProgress, String> {
        let guest = self.guest.clone();
        blocking(move || stream_of(&guest)?.outgoing().map_err(|e| e.to_string())).await
    }

    /// A progress event from the guest's own figures.
    fn emit_stream(&self, phase: Phase, p: &StreamProgress, started: Instant) {
        let elapsed = started.elapsed().as_secs_f64().max(1e-3);
        let rate = if p.rate > 0.0 {
            p.rate
        } else {
            p.transferred as f64 / elapsed
        };
        let mut event = self.event(phase, round_of(p), p.transferred, 0, None, 0.0);
        event.remaining_pages = p.remaining.div_ceil(PAGE_SIZE as u64);
        event.bandwidth = rate;
        event.rate = rate;
        event.round_bytes_sent = p.transferred;
        event.mid_round = matches!(p.status, StreamStatus::Active);
        event.expected_downtime = p.expected_downtime.unwrap_or_default();
        event.eta = (rate > 0.0).then(|| Duration::from_secs_f64(p.remaining as f64 / rate));
        self.emit(event);
    }
}

fn round_of(p: &StreamProgress) -> u32 {
    u32::try_from(p.round).unwrap_or(u32::MAX)
}

/// The stream steps of `guest`, which the job checked it has.
fn stream_of(guest: &Arc<dyn Guest>) -> Result<&dyn StreamGuest, String> {
    guest
        .as_stream()
        .ok_or_else(|| format!("a {} guest does not migrate as a stream", guest.kind()))
}

/// Runs a guest control call (a QMP round trip) off the runtime's workers.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| format!("guest control call failed: {e}"))?
}
