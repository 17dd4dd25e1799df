//! One quinn endpoint per local network address, with UDP buffers sized for bulk
//! transfer and QUIC transport settings derived from [`NetworkConfig`]. Everything
//! here is set-up; nothing runs after a connection exists.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{AckFrequencyConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{NetworkConfig, MIN_MTU};
use crate::error::TransportError;
use crate::identity::TlsConfigs;

/// A bound endpoint and the client configurations used to dial from it.
#[derive(Clone)]
pub(crate) struct LocalEndpoint {
    pub addr: SocketAddr,
    pub endpoint: quinn::Endpoint,
    /// RPC connections: long idle timeout, slow keep-alive.
    pub rpc_client: quinn::ClientConfig,
    /// Page-stream paths: idle timeout = the dead-path deadline, fast keep-alive.
    pub stream_client: quinn::ClientConfig,
}

/// Largest UDP payload one segmentation-offload send may carry: the kernel refuses
/// a larger batch (EMSGSIZE) and quinn then stops using GSO altogether.
const GSO_MAX_BYTES: usize = 65_000;

/// A UDP socket that hands the kernel no segmentation-offload batch larger than
/// [`GSO_MAX_BYTES`]. quinn batches up to 10 datagrams whatever their size, which
/// at MTUs above ~6400 exceeds what one send may carry: the kernel refuses it and
/// quinn turns offload off for good. A larger batch is sent as several; the batch
/// size cannot be fixed up front, since a connection's MTU grows by discovery.
#[derive(Debug)]
struct SegmentCapped {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

/// The parts of a batch of `len` bytes in `segment`-byte datagrams that each
/// fit in [`GSO_MAX_BYTES`]: `(start, end)` byte ranges, whole datagrams each.
fn gso_parts(len: usize, segment: usize) -> impl Iterator<Item = (usize, usize)> {
    let per_part = (GSO_MAX_BYTES / segment.max(1)).max(1) * segment.max(1);
    (0..len)
        .step_by(per_part)
        .map(move |start| (start, (start + per_part).min(len)))
}

impl quinn::AsyncUdpSocket for SegmentCapped {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if transmit.contents.len() > GSO_MAX_BYTES => segment,
            _ => return self.inner.try_send(transmit),
        };
        for (i, (start, end)) in gso_parts(transmit.contents.len(), segment).enumerate() {
            let part = quinn::udp::Transmit {
                contents: &transmit.contents[start..end],
                segment_size: (end - start > segment).then_some(segment),
                ..*transmit
            };
            match self.inner.try_send(&part) {
                Ok(()) => {}
                // Nothing sent yet: quinn waits for the socket and tries again.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch is out: the rest counts as lost on the way
                // (QUIC resends it) rather than sending the first part twice.
                Err(e) => {
                    tracing::debug!(error = %e, "rest of a segmentation-offload batch dropped");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps both at net.core.[rw]mem_max.
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::debug!(%addr, error = %e, "cannot set SO_RCVBUF");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::debug!(%addr, error = %e, "cannot set SO_SNDBUF");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    tracing::debug!(
        %addr,
        requested = buffer,
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket.into())
}

/// QUIC settings for bulk transfer on a network whose datagrams start at `mtu`
/// bytes and may grow by discovery up to `ceiling`.
pub(crate) fn transport_config(
    cfg: &NetworkConfig,
    mtu: u16,
    ceiling: u16,
    idle: Duration,
    keepalive: Duration,
) -> TransportConfig {
    let mut t = TransportConfig::default();
    let mtu = mtu.max(MIN_MTU);
    t.initial_mtu(mtu);
    t.min_mtu(MIN_MTU);
    // Each connection probes upward from `mtu` (RFC 8899: padded probes, a lost
    // one costs nothing but itself; one the local interface cannot carry fails
    // at once with EMSGSIZE), so a jumbo-frame network is used as one without
    // being configured as one. Quinn's black-hole detection falls back to
    // MIN_MTU if a size that worked stops working.
    let mut disc = MtuDiscoveryConfig::default();
    disc.upper_bound(ceiling.max(mtu));
    t.mtu_discovery_config(Some(disc));
    t.max_idle_timeout(IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(keepalive));
    // Windows large enough that one path can keep a whole per-path budget in flight.
    let window = cfg
        .page_stream
        .path_window_bytes
        .max(cfg.max_frame_bytes as usize)
        .max(8 << 20) as u64;
    t.stream_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
    t.receive_window(VarInt::from_u64(window * 2).unwrap_or(VarInt::MAX));
    t.send_window(window * 2);
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_concurrent_requests));
    t.max_concurrent_uni_streams(VarInt::from_u32(cfg.max_concurrent_requests));
    // Loopback and LAN: start from a realistic RTT instead of the 333 ms default, so
    // loss recovery and handshake retransmits react within the dead-path deadline.
    t.initial_rtt(Duration::from_millis(10));
    t
}

pub(crate) fn bind(
    addr: SocketAddr,
    cfg: &NetworkConfig,
    tls: &TlsConfigs,
) -> Result<LocalEndpoint, TransportError> {
    let mtu = cfg.mtu_for(addr.ip());
    let ceiling = cfg.mtu_ceiling_for(addr.ip());
    let socket = bind_udp(addr, cfg.socket_buffer_bytes)
        .map_err(|source| TransportError::Bind { addr, source })?;
    let mut server = quinn::ServerConfig::with_crypto(tls.server.clone());
    server.transport_config(Arc::new(transport_config(
        cfg,
        mtu,
        ceiling,
        cfg.idle_timeout,
        cfg.keepalive_interval,
    )));
    // Quinn accepts (and tells peers it accepts) only 1472-byte datagrams by default,
    // which would silently cap every larger MTU: accept what discovery may reach.
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(ceiling)
        .map_err(|e| TransportError::Config(format!("MTU {ceiling}: {e}")))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket)
        .map_err(|source| TransportError::Bind { addr, source })?;
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        endpoint_config,
        Some(server),
        Arc::new(SegmentCapped { inner: socket }),
        runtime,
    )
    .map_err(|source| TransportError::Bind { addr, source })?;
    let local = endpoint
        .local_addr()
        .map_err(|source| TransportError::Bind { addr, source })?;

    let mut rpc_client = quinn::ClientConfig::new(tls.client.clone());
    rpc_client.transport_config(Arc::new(transport_config(
        cfg,
        mtu,
        ceiling,
        cfg.idle_timeout,
        cfg.keepalive_interval,
    )));
    let ps = &cfg.page_stream;
    let mut stream_transport =
        transport_config(cfg, mtu, ceiling, ps.path_dead_after, ps.heartbeat_interval);
    // Bulk one-way data: ask the receiver to acknowledge every 8th packet instead of
    // every 2nd, which saves both sides a good share of per-packet work.
    let mut ack = AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(8));
    stream_transport.ack_frequency_config(Some(ack));
    let mut stream_client = quinn::ClientConfig::new(tls.client.clone());
    stream_client.transport_config(Arc::new(stream_transport));
    Ok(LocalEndpoint {
        addr: local,
        endpoint,
        rpc_client,
        stream_client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_split_into_whole_datagrams_that_fit_one_send() {
        // Ten jumbo datagrams (89 520 bytes) go as 7 + 3.
        let parts: Vec<_> = gso_parts(10 * 8952, 8952).collect();
        assert_eq!(parts, vec![(0, 7 * 8952), (7 * 8952, 10 * 8952)]);
        // A short last datagram stays in the last part.
        let parts: Vec<_> = gso_parts(9 * 8952 + 100, 8952).collect();
        assert_eq!(parts, vec![(0, 7 * 8952), (7 * 8952, 9 * 8952 + 100)]);
        for (start, end) in gso_parts(10 * 1452, 1452) {
            assert!(end - start <= GSO_MAX_BYTES);
        }
        assert_eq!(gso_parts(10 * 1452, 1452).count(), 1);
    }
}
