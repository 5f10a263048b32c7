//! somna-netd: slot claim latency, slot creation rate, and the cost of the
//! TC programs on the data path. Prints one JSON object.
//!
//!     target/release/netd-bench
//!
//! Needs root. Everything runs between namespaces this binary creates: an
//! "internet" namespace behind its own veth is netd's only egress, and the
//! traffic goes from a slot to it. Env: SOMNA_BENCH_POOL (slots per claim
//! round, default 32), SOMNA_BENCH_ROUNDS (claim rounds, default 10),
//! SOMNA_BENCH_RR (request/response round trips per path and repetition,
//! default 2000), SOMNA_BENCH_MB (bulk MiB per path and repetition, default
//! 128), SOMNA_BENCH_REPS (alternating repetitions, default 5).
//!
//! Data path numbers: a TCP stream and a 1-byte request/response loop from
//! a socket inside the slot's namespace (which crosses the host veth and
//! both of its programs, NAT and routing) to the internet namespace, once
//! with the programs attached and once on a slot whose programs were
//! detached, alternating for SOMNA_BENCH_REPS repetitions (round-trip
//! samples pooled, throughput: the median). A second pair of runs goes through the TAP (guest_ingress too)
//! via the test stand-in for a VM, whose userspace frame relay dominates
//! that path; it is reported for completeness.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use somna_netd::{
    EgressPolicy, Netd, NetdConfig, Slot,
    testing::{GuestStandIn, Internet, TcpServer, in_netns},
};

type BoxError = Box<dyn std::error::Error>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary_us(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({
        "count": v.len(),
        "p50_us": percentile(&v, 0.50),
        "p99_us": percentile(&v, 0.99),
        "max_us": v.last().copied().unwrap_or(0.0),
    })
}

/// Round trips of one byte over `s`, in microseconds.
fn request_response(s: &mut TcpStream, n: usize) -> Result<Vec<f64>, BoxError> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut lat = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..n {
        let t = Instant::now();
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

/// Sends `mib` MiB to a discarding server: MiB/s.
fn bulk(s: &mut TcpStream, mib: usize) -> Result<f64, BoxError> {
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    // The server closes after reading everything: wait for its FIN so the
    // time covers delivery, not just the local send buffer.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(mib as f64 / t.elapsed().as_secs_f64())
}

struct PathResult {
    rr: Vec<f64>,
    mib_s: f64,
}

/// Runs the request/response and bulk tests over connections `connect`
/// makes to the echo and the discard servers.
fn measure_path(
    connect: &dyn Fn(SocketAddrV4) -> Result<TcpStream, BoxError>,
    echo: SocketAddrV4,
    discard: SocketAddrV4,
    rr: usize,
    mib: usize,
) -> Result<PathResult, BoxError> {
    let mut s = connect(echo)?;
    // Warm-up (ARP, conntrack, caches).
    request_response(&mut s, 200)?;
    let rr = request_response(&mut s, rr)?;
    drop(s);
    let mut s = connect(discard)?;
    let mib_s = bulk(&mut s, mib)?;
    Ok(PathResult { rr, mib_s })
}

fn slot_connect(slot: &Slot) -> impl Fn(SocketAddrV4) -> Result<TcpStream, BoxError> + '_ {
    move |to| {
        let s = in_netns(&slot.netns_path, || {
            TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)).map_err(|e| {
                somna_netd::NetError::Io {
                    context: format!("connecting to {to}"),
                    source: e,
                }
            })
        })?;
        Ok(s)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn overhead(with: &[PathResult], without: &[PathResult]) -> Value {
    let pooled = |rs: &[PathResult]| {
        let mut v: Vec<f64> = rs.iter().flat_map(|r| r.rr.iter().copied()).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (w, o) = (pooled(with), pooled(without));
    let tw = median(with.iter().map(|r| r.mib_s).collect());
    let to = median(without.iter().map(|r| r.mib_s).collect());
    json!({
        "with_programs": { "rr": summary_us(w.clone()), "throughput_mib_s_median": tw },
        "without_programs": { "rr": summary_us(o.clone()), "throughput_mib_s_median": to },
        "rr_p50_overhead_us": percentile(&w, 0.5) - percentile(&o, 0.5),
        "rr_p99_overhead_us": percentile(&w, 0.99) - percentile(&o, 0.99),
        "throughput_change_pct": (tw - to) / to * 100.0,
    })
}

fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("SOMNA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let pool = env_usize("SOMNA_BENCH_POOL", 32);
    let rounds = env_usize("SOMNA_BENCH_ROUNDS", 10);
    let rr_n = env_usize("SOMNA_BENCH_RR", 2000);
    let mib = env_usize("SOMNA_BENCH_MB", 128);
    let reps = env_usize("SOMNA_BENCH_REPS", 5).max(1);

    let inet = Internet::create("somnab", "203.0.113.60/30".parse()?)?;
    let config = NetdConfig {
        name_prefix: "somnab".into(),
        pool_size: pool,
        host_subnet: "100.126.0.0/22".parse()?,
        egress: inet.egress(),
        ..Default::default()
    };

    // Start-up builds the whole pool: creation rate, programs loaded once.
    let t = Instant::now();
    let netd = Netd::start(config)?;
    let start_s = t.elapsed().as_secs_f64();

    // Claims from a full pool; between rounds the background refill
    // rebuilds what was claimed (that time is the steady-state creation
    // rate, programs attached and NAT loaded per slot).
    let mut claim_us = Vec::new();
    let mut refill_rates = Vec::new();
    let mut release_us = Vec::new();
    for round in 0..rounds {
        if !netd.wait_pool_full(Duration::from_secs(120)) {
            return Err(format!("pool not refilled: {:?}", netd.pool_status()).into());
        }
        let mut slots = Vec::with_capacity(pool);
        let t_round = Instant::now();
        for i in 0..pool {
            let t = Instant::now();
            slots.push(netd.claim(&format!("bench-{round}-{i}"), &EgressPolicy::default())?);
            claim_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        // The refill started with the first claim.
        if !netd.wait_pool_full(Duration::from_secs(120)) {
            return Err(format!("pool not refilled: {:?}", netd.pool_status()).into());
        }
        refill_rates.push(pool as f64 / t_round.elapsed().as_secs_f64());
        for s in slots {
            let t = Instant::now();
            netd.release(s.id)?;
            release_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let pool_misses = claim_us.iter().filter(|&&us| us > 10_000.0).count();

    // Data path: two slots, one with the programs and one without, measured
    // alternately so that load from elsewhere on the host hits both alike.
    let echo = TcpServer::spawn(inet.listen(7000)?, true)?;
    let discard = TcpServer::spawn(inet.listen(7001)?, false)?;
    let with = netd.claim("bench-with", &EgressPolicy::default())?;
    let without = netd.claim("bench-without", &EgressPolicy::default())?;
    netd.detach_programs_for_benchmark(without.id)?;
    let g_with = GuestStandIn::attach(&with, "somnab-gw")?;
    let g_without = GuestStandIn::attach(&without, "somnab-go")?;
    let via = |g: &GuestStandIn, to: SocketAddrV4| -> Result<TcpStream, BoxError> {
        Ok(g.connect(to, Duration::from_secs(5))??)
    };
    let (mut veth_with, mut veth_without, mut tap_with, mut tap_without) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        veth_with.push(measure_path(
            &slot_connect(&with),
            echo.addr(),
            discard.addr(),
            rr_n,
            mib,
        )?);
        veth_without.push(measure_path(
            &slot_connect(&without),
            echo.addr(),
            discard.addr(),
            rr_n,
            mib,
        )?);
        tap_with.push(measure_path(
            &|to| via(&g_with, to),
            echo.addr(),
            discard.addr(),
            rr_n / 5,
            mib / 8,
        )?);
        tap_without.push(measure_path(
            &|to| via(&g_without, to),
            echo.addr(),
            discard.addr(),
            rr_n / 5,
            mib / 8,
        )?);
    }
    drop((g_with, g_without));
    netd.release(with.id)?;
    netd.release(without.id)?;

    let t = Instant::now();
    netd.shutdown()?;
    let shutdown_s = t.elapsed().as_secs_f64();
    drop(netd);
    drop((echo, discard, inet));

    let out = json!({
        "bench": "netd",
        "accelerator": "none",
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "pool_size": pool,
        "rounds": rounds,
        "slot_claim": summary_us(claim_us),
        "slot_claim_pool_misses": pool_misses,
        "slot_release": summary_us(release_us),
        "slot_creation": {
            "start_with_pool_s": start_s,
            "start_slots_per_s": pool as f64 / start_s,
            "refill_slots_per_s_per_round": refill_rates,
        },
        "data_path_repetitions": reps,
        "tc_overhead_veth_path": overhead(&veth_with, &veth_without),
        "tc_overhead_tap_path_userspace_relay": overhead(&tap_with, &tap_without),
        "shutdown_s": shutdown_s,
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
