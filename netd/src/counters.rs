//! [`Counters`]: per-sandbox traffic counters and the activity clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bpf::SlotStats;

/// Traffic of one sandbox since its slot was claimed. "tx" is what the
/// sandbox sent (after policy), "rx" what reached it; bytes are Ethernet
/// frame bytes (a GSO frame counts once, with one set of headers). ARP
/// between the slot and the host is not counted.
///
/// `last_activity_*` is the last packet in either direction that was not
/// health-check traffic (see [`crate::Netd::health_check_addr`]); `None` if
/// there was none since the claim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Packets to the sandbox dropped by policy (not exposed, ...).
    pub rx_dropped: u64,
    /// Packets from the sandbox dropped by policy (isolation, lists, ...).
    pub tx_dropped: u64,
    /// `CLOCK_MONOTONIC` time of the last activity, in nanoseconds.
    pub last_activity_mono_ns: Option<u64>,
    /// The same instant as wall-clock milliseconds since the Unix epoch.
    pub last_activity_unix_ms: Option<u64>,
}

impl Counters {
    pub(crate) fn from_stats(s: &SlotStats) -> Self {
        let mono = (s.last_activity_ns != 0).then_some(s.last_activity_ns);
        Counters {
            rx_bytes: s.rx_bytes,
            rx_packets: s.rx_packets,
            tx_bytes: s.tx_bytes,
            tx_packets: s.tx_packets,
            rx_dropped: s.rx_dropped,
            tx_dropped: s.tx_dropped,
            last_activity_mono_ns: mono,
            last_activity_unix_ms: mono.map(|ns| {
                let ago = Duration::from_nanos(monotonic_now_ns().saturating_sub(ns));
                let at = SystemTime::now() - ago;
                at.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0)
            }),
        }
    }

    /// How long ago the last activity was (`None`: none since the claim).
    pub fn idle_for(&self) -> Option<Duration> {
        self.last_activity_mono_ns
            .map(|ns| Duration::from_nanos(monotonic_now_ns().saturating_sub(ns)))
    }
}

/// `CLOCK_MONOTONIC` now, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}
