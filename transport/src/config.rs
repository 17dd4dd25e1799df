//! Network settings of a node: MTU per network, socket buffers, timeouts, and the
//! page stream's budgets. Defaults are safe on any network; the jumbo settings are
//! documented where they matter.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A UDP payload every IPv4 path with a 1500-byte MTU carries
/// (1500 - 20 IPv4 - 8 UDP - 20 spare for tunnels and IPv6).
pub const DEFAULT_MTU: u16 = 1452;
/// UDP payload for jumbo-frame (9000-byte) migration networks and loopback
/// (9000 - 20 IPv4 - 8 UDP - 20 spare, as [`DEFAULT_MTU`]).
///
/// Segmentation offload batches are capped to what one send may carry (see
/// `endpoint::SegmentCapped`), so a larger MTU keeps paying off up to the
/// network's limit (`stream_bench --mtu-sweep`).
pub const JUMBO_MTU: u16 = 8952;
/// QUIC's floor: every path must carry 1200-byte datagrams.
pub const MIN_MTU: u16 = 1200;
/// Largest MTU used (Ethernet jumbo frames); larger settings are clamped to it.
pub const MAX_MTU: u16 = 9000;

/// MTU of one network, chosen for a local address by longest-prefix match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetMtu {
    pub network: IpAddr,
    pub prefix_len: u8,
    pub mtu: u16,
}

/// Page stream tuning. Both ends read it: the sender for budgets and heartbeats, the
/// receiver for its own "every path is gone" deadline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PageStreamConfig {
    /// Pages per chunk: the unit of sequence numbers, acknowledgement and resend.
    pub chunk_pages: u32,
    /// Bytes sent but not yet acknowledged, over all paths. `send` waits when full.
    pub inflight_budget_bytes: usize,
    /// Most unacknowledged bytes one path may hold (also capped by an equal share of
    /// the budget).
    pub path_window_bytes: usize,
    /// Below that cap, a path holds what it delivers in this time (plus four chunks):
    /// a slow path holds little, so rounds do not end waiting for it.
    pub path_window_time: Duration,
    /// How often the sender pings each path.
    pub heartbeat_interval: Duration,
    /// A path that shows no sign of life for this long is dropped. Also the QUIC idle
    /// timeout of page-stream connections.
    pub path_dead_after: Duration,
    /// When no path has been up for this long, the stream fails.
    pub fail_after: Duration,
    /// Pause between attempts to bring a dead path back.
    pub reconnect_interval: Duration,
    /// QUIC connections a stream opens on each network. One connection's packets
    /// are encrypted and sent by one task, which caps a path near one core; on a
    /// machine with cores to spare, several connections per network carry a move
    /// in parallel. Default: one per four cores, 1 to 4.
    #[serde(default = "default_connections_per_network")]
    pub connections_per_network: u32,
    /// A byte stream's in-flight budget (a QEMU migration stream). Smaller than a
    /// page stream's: what is in flight when the guest pauses for its switchover
    /// drains inside the blackout.
    #[serde(default = "default_byte_stream_budget_bytes")]
    pub byte_stream_budget_bytes: usize,
}

/// 8 MiB: what two loopback or 10 GbE paths keep busy (see `stream_bench`).
pub fn default_byte_stream_budget_bytes() -> usize {
    8 << 20
}

/// One connection per four cores, at least one and at most four.
pub fn default_connections_per_network() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 4).clamp(1, 4) as u32
}

impl Default for PageStreamConfig {
    fn default() -> Self {
        PageStreamConfig {
            chunk_pages: 64,
            inflight_budget_bytes: 64 << 20,
            path_window_bytes: 32 << 20,
            path_window_time: Duration::from_millis(200),
            heartbeat_interval: Duration::from_millis(50),
            path_dead_after: Duration::from_millis(300),
            fail_after: Duration::from_secs(2),
            reconnect_interval: Duration::from_millis(150),
            connections_per_network: default_connections_per_network(),
            byte_stream_budget_bytes: default_byte_stream_budget_bytes(),
        }
    }
}

/// Settings of one node's transport.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Initial UDP payload on every network without a [`SubnetMtu`] entry. Each
    /// connection then probes upward to [`mtu_ceiling`](Self::mtu_ceiling); if a
    /// larger datagram is lost repeatedly, quinn falls back to 1200.
    pub mtu: u16,
    /// Largest UDP payload a connection's MTU discovery probes for (RFC 8899),
    /// on every network: a jumbo-frame network (or loopback) is used as one
    /// without an entry in [`network_mtu`](Self::network_mtu). Probes the path
    /// cannot carry are lost or refused locally and cost only themselves. At or
    /// below a network's MTU, that MTU is also its largest.
    #[serde(default = "default_mtu_ceiling")]
    pub mtu_ceiling: u16,
    /// Per-network MTUs (migration networks often run jumbo frames, see [`JUMBO_MTU`]).
    pub network_mtu: Vec<SubnetMtu>,
    /// Requested SO_SNDBUF / SO_RCVBUF. The kernel caps it at `net.core.[rw]mem_max`
    /// (raise those for 10G+ links); the effective size is logged.
    pub socket_buffer_bytes: usize,
    /// QUIC idle timeout of RPC connections: a path silent this long is dropped and
    /// redialled. Calls do not wait for it; they hedge onto another path first.
    pub idle_timeout: Duration,
    /// QUIC keep-alive of RPC connections.
    pub keepalive_interval: Duration,
    /// Bound on establishing a connection and exchanging hellos.
    pub connect_timeout: Duration,
    /// Largest frame (request, response, message, chunk) accepted or sent.
    pub max_frame_bytes: u32,
    /// Concurrent request streams (and, separately, one-way streams) one peer
    /// connection may have open; a caller's next call waits for a free one. A page
    /// stream uses one of each per connection; 64 concurrent calls on one connection
    /// is more than any service makes, and bounds what a hostile member holds.
    pub max_concurrent_requests: u32,
    /// What a stranger or a member may make this node hold.
    #[serde(default)]
    pub limits: crate::limits::PeerLimits,
    pub page_stream: PageStreamConfig,
    /// Tests only: speak these wire versions `(min, max)` instead of this build's
    /// ([`Versions::THIS_BUILD`](crate::protocol::Versions::THIS_BUILD)), to run a
    /// node as a build of another version would (`Some((2, 2))`: as the build before
    /// listed chunks) beside nodes of this one. Versions above this build's only
    /// serve to test refusals: their formats are this build's.
    #[doc(hidden)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speak_versions: Option<(u16, u16)>,
    /// Tests only: run the hello as builds from before version ranges did. The node
    /// speaks only its highest version; as a client it sends no range, as a server
    /// it refuses a hello that carries one (as trailing bytes) or another version.
    /// With `speak_versions: Some((2, 2))`, the wire of the build before listed
    /// chunks; with `Some((3, 3))`, of the last build before ranges.
    #[doc(hidden)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hello_without_range: bool,
}

fn default_mtu_ceiling() -> u16 {
    JUMBO_MTU
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mtu: DEFAULT_MTU,
            mtu_ceiling: default_mtu_ceiling(),
            network_mtu: Vec::new(),
            socket_buffer_bytes: 8 << 20,
            idle_timeout: Duration::from_millis(1500),
            // Often enough that a live path is never silent for a call's hedge
            // delay (100 ms at least; see `rpc::client`).
            keepalive_interval: Duration::from_millis(40),
            connect_timeout: Duration::from_secs(2),
            max_frame_bytes: 16 << 20,
            max_concurrent_requests: 64,
            limits: crate::limits::PeerLimits::default(),
            page_stream: PageStreamConfig::default(),
            speak_versions: None,
            hello_without_range: false,
        }
    }
}

impl NetworkConfig {
    /// Defaults with a jumbo MTU everywhere: for loopback clusters and tests.
    pub fn loopback() -> Self {
        NetworkConfig {
            mtu: JUMBO_MTU,
            ..Default::default()
        }
    }

    /// The wire versions this node speaks: this build's, unless a test overrides them
    /// ([`speak_versions`](Self::speak_versions)).
    pub fn wire_versions(&self) -> crate::protocol::Versions {
        use crate::protocol::Versions;
        let v = match self.speak_versions {
            Some((min, max)) => Versions { min, max },
            None => Versions::THIS_BUILD,
        };
        if self.hello_without_range {
            Versions::only(v.max)
        } else {
            v
        }
    }

    /// The largest UDP payload MTU discovery probes for on the network of `ip`.
    pub fn mtu_ceiling_for(&self, ip: IpAddr) -> u16 {
        self.mtu_ceiling.max(self.mtu_for(ip))
    }

    /// The MTU the endpoint bound to `ip` starts from.
    pub fn mtu_for(&self, ip: IpAddr) -> u16 {
        let mut best: Option<(u8, u16)> = None;
        for rule in &self.network_mtu {
            if prefix_matches(rule.network, rule.prefix_len, ip)
                && best.is_none_or(|(len, _)| rule.prefix_len > len)
            {
                best = Some((rule.prefix_len, rule.mtu));
            }
        }
        best.map_or(self.mtu, |(_, mtu)| mtu)
            .clamp(MIN_MTU, MAX_MTU)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let ps = &self.page_stream;
        // A listed chunk (scattered pages) carries a 4-byte offset per page too.
        let chunk_bytes = ps.chunk_pages as usize * crate::protocol::PAGE_SIZE
            + crate::protocol::chunk_prefix_len(ps.chunk_pages, true)
            + 1;
        if !(1..=16).contains(&ps.connections_per_network) {
            return Err(format!(
                "connections_per_network {} out of range (1 to 16)",
                ps.connections_per_network
            ));
        }
        if ps.chunk_pages == 0 || ps.chunk_pages > crate::protocol::MAX_CHUNK_PAGES {
            return Err(format!("chunk_pages {} out of range", ps.chunk_pages));
        }
        if chunk_bytes > self.max_frame_bytes as usize {
            return Err(format!(
                "a chunk of {} pages ({chunk_bytes} bytes) exceeds max_frame_bytes {}",
                ps.chunk_pages, self.max_frame_bytes
            ));
        }
        if let Some((min, max)) = self.speak_versions {
            if min == 0 || min > max {
                return Err(format!("speak_versions ({min}, {max}) is not a range"));
            }
        }
        if ps.heartbeat_interval.is_zero() || ps.path_dead_after <= ps.heartbeat_interval {
            return Err("path_dead_after must exceed a non-zero heartbeat_interval".into());
        }
        Ok(())
    }
}

/// Number of leading bits two addresses share (0 across families).
pub(crate) fn common_prefix_len(a: IpAddr, b: IpAddr) -> u32 {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
        _ => 0,
    }
}

fn prefix_matches(network: IpAddr, prefix_len: u8, ip: IpAddr) -> bool {
    let same_family = network.is_ipv4() == ip.is_ipv4();
    same_family && common_prefix_len(network, ip) >= u32::from(prefix_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_by_longest_prefix() {
        let cfg = NetworkConfig {
            network_mtu: vec![
                SubnetMtu {
                    network: "127.2.0.0".parse().unwrap(),
                    prefix_len: 16,
                    mtu: 6000,
                },
                SubnetMtu {
                    network: "127.2.3.0".parse().unwrap(),
                    prefix_len: 24,
                    mtu: 4000,
                },
            ],
            ..Default::default()
        };
        assert_eq!(cfg.mtu_for("127.1.0.1".parse().unwrap()), DEFAULT_MTU);
        assert_eq!(cfg.mtu_for("127.2.0.1".parse().unwrap()), 6000);
        assert_eq!(cfg.mtu_for("127.2.3.9".parse().unwrap()), 4000);
        assert_eq!(cfg.mtu_for("::1".parse().unwrap()), DEFAULT_MTU);
        assert!(cfg.validate().is_ok());
    }
}
