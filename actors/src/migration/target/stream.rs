//! The target side for a guest that migrates itself as one byte stream
//! (QEMU): `Prepare` starts the guest waiting for its stream and pumps the
//! multipath byte stream into it; `Complete` answers once every byte went in
//! and the guest says it loaded the stream. The guest stays paused: it runs
//! only through `resume_if_committed`, as every incoming guest does.

use crate::migration::protocol::{GuestSpec, Reply};
use crate::node::{lock, Hosted, NodeShared, Role};
use ferry_cluster::NodeId;
use ferry_vmm::{Guest, StreamStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the target guest may take to listen for its stream, and to load
/// it after the last byte.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one look at the guest's incoming status waits for it to
/// change while `Complete` waits.
const POLL: Duration = Duration::from_millis(20);

/// An incoming byte stream being pumped into a stream guest. Dropping it
/// (the copy was resumed or discarded) stops the pump.
pub(crate) struct IncomingStream {
    pump: tokio::task::JoinHandle<()>,
    /// The pump's end: bytes delivered, or why it failed.
    outcome: Arc<Mutex<Option<Result<u64, String>>>>,
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl NodeShared {
    /// `Prepare` for a stream guest: the guest started waiting for its stream,
    /// and the byte stream accepted and pumped into it.
    pub(super) async fn prepare_stream(
        self: &Arc<Self>,
        migration: u64,
        vm: String,
        epoch: u64,
        spec: GuestSpec,
        from: NodeId,
    ) -> Reply {
        if let Err(reason) = self.admit_incoming(migration, &vm, epoch, &spec, from) {
            return Reply::Refused { reason };
        }
        // Both ends of a move must run the same CPU model: the store says
        // whether this VM runs with the baseline one.
        let compatibility = self
            .cluster
            .read()
            .vms
            .get(&vm)
            .is_some_and(|v| v.processor_compatibility);
        let (built_spec, lease) = (spec.clone(), self.run_lease().clone());
        let guest = match tokio::task::spawn_blocking(move || {
            let guest = crate::qemu::build(&built_spec, compatibility, true)?;
            guest.bind_lease(lease);
            Ok::<_, String>(guest)
        })
        .await
        {
            Ok(Ok(g)) => g,
            Ok(Err(reason)) => return Reply::Refused { reason },
            Err(e) => {
                return Reply::Refused {
                    reason: format!("starting the guest failed: {e}"),
                }
            }
        };
        let refuse = |guest: &Arc<dyn Guest>, reason: String| {
            guest.destroy();
            Reply::Refused { reason }
        };
        let Some(socket) = guest
            .as_stream()
            .map(|s| s.run_dir().join(format!("in-{migration}.sock")))
        else {
            let reason = format!("a {} guest does not migrate as a stream", guest.kind());
            return refuse(&guest, reason);
        };
        let listening = {
            let (guest, socket) = (guest.clone(), socket.clone());
            tokio::task::spawn_blocking(move || match guest.as_stream() {
                Some(s) => s.accept_incoming(&socket).map_err(|e| e.to_string()),
                None => Err("not a stream guest".into()),
            })
            .await
        };
        match listening {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return refuse(&guest, reason),
            Err(e) => return refuse(&guest, e.to_string()),
        }
        let receiver = match self.rpc.accept_byte_stream(migration, from) {
            Ok(r) => r,
            Err(e) => return refuse(&guest, e.to_string()),
        };
        let outcome = Arc::new(Mutex::new(None));
        let pump = {
            let outcome = outcome.clone();
            tokio::spawn(async move {
                let result = async {
                    let mut input = connect(&socket).await?;
                    receiver
                        .pump_into(&mut input)
                        .await
                        .map(|stats| stats.bytes_delivered)
                        .map_err(|e| e.to_string())
                }
                .await;
                if let Err(e) = &result {
                    tracing::info!(migration, "incoming stream ended: {e}");
                }
                *lock(&outcome) = Some(result);
            })
        };
        lock(&self.vms).insert(
            vm,
            Hosted {
                guest,
                spec,
                role: Role::Incoming {
                    migration,
                    receiver: None,
                    stream: Some(IncomingStream { pump, outcome }),
                    verified: false,
                    verified_digest: None,
                },
            },
        );
        Reply::Prepared
    }

    /// Whether `migration` brings a stream guest here.
    pub(super) fn incoming_is_stream(&self, migration: u64) -> bool {
        lock(&self.vms).values().any(|h| {
            matches!(&h.role, Role::Incoming { migration: m, stream: Some(_), .. } if *m == migration)
        })
    }

    /// `Complete` for a stream guest: waits until every byte went into the
    /// guest and the guest loaded the stream (it stays paused), then marks
    /// the copy verified.
    pub(super) async fn complete_stream(&self, migration: u64) -> Reply {
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            let (guest, pumped) = {
                let vms = lock(&self.vms);
                let found = vms.values().find_map(|h| match &h.role {
                    Role::Incoming {
                        migration: m,
                        stream: Some(s),
                        ..
                    } if *m == migration => Some((h.guest.clone(), lock(&s.outcome).clone())),
                    _ => None,
                });
                match found {
                    Some(f) => f,
                    None => {
                        return Reply::Refused {
                            reason: format!("no incoming migration {migration} here"),
                        }
                    }
                }
            };
            if let Some(Err(reason)) = pumped {
                return Reply::Refused { reason };
            }
            let status = {
                let guest = guest.clone();
                tokio::task::spawn_blocking(move || match guest.as_stream() {
                    Some(s) => s.wait_incoming(POLL).map_err(|e| e.to_string()),
                    None => Err("not a stream guest".into()),
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
            };
            match status {
                Err(reason) => return Reply::Refused { reason },
                Ok(StreamStatus::Failed(e)) => {
                    return Reply::Refused {
                        reason: format!("the guest could not load the stream: {e}"),
                    }
                }
                Ok(StreamStatus::Completed) if pumped.is_some() => {
                    return self.mark_verified(migration);
                }
                Ok(_) => {}
            }
            if Instant::now() >= deadline {
                return Reply::Refused {
                    reason: format!("the guest did not load the stream within {LOAD_TIMEOUT:?}"),
                };
            }
            // The pump may still be delivering the last bytes.
            if pumped.is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    fn mark_verified(&self, migration: u64) -> Reply {
        let mut vms = lock(&self.vms);
        for h in vms.values_mut() {
            if let Role::Incoming {
                migration: m,
                verified,
                ..
            } = &mut h.role
            {
                if *m == migration {
                    *verified = true;
                    return Reply::Verified { digest: None };
                }
            }
        }
        Reply::Refused {
            reason: format!("no incoming migration {migration} here"),
        }
    }
}

/// Connects to the guest's incoming socket, which it opened before
/// `accept_incoming` returned (retried briefly all the same).
async fn connect(socket: &std::path::Path) -> Result<tokio::net::UnixStream, String> {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("connecting to {}: {e}", socket.display()))
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}
