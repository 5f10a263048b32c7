//! Placement: which host a new sandbox goes to. A host must be ready, have
//! the capabilities asked for, and fit the sandbox's vCPUs and memory within
//! its overcommit ratios; among those, hosts score by what makes the create
//! fast (a ready warm-pool VM, a template, the image in cache) and by load,
//! packed or spread by policy. Every decision carries its reasons.

use std::fmt::Write as _;

/// How to weigh load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Fill the emptiest host first (default: blast radius, headroom).
    #[default]
    Spread,
    /// Fill the fullest host that fits (fewer hosts busy).
    Pack,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spread" => Ok(Policy::Spread),
            "pack" => Ok(Policy::Pack),
            other => Err(format!(
                "unknown placement policy {other:?}: use spread or pack"
            )),
        }
    }
}

/// Overcommit ratios: allocatable = capacity × ratio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overcommit {
    pub cpu: f64,
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        // vCPUs of idle sandboxes mostly wait; guest RAM is touched lazily
        // but is not given back, so memory is not overcommitted by default.
        Overcommit {
            cpu: 4.0,
            memory: 1.0,
        }
    }
}

/// What the scheduler knows about a host.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub id: String,
    pub ready: bool,
    pub cpus: u32,
    pub memory_mib: u64,
    pub cpus_allocated: u32,
    pub memory_allocated_mib: u64,
    /// Warm-pool VMs ready for this request's image and size.
    pub warm_pool_ready: bool,
    pub has_template: bool,
    pub image_cached: bool,
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub cpus: u32,
    pub memory_mib: u64,
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Index into the host slice.
    pub host: usize,
    pub score: f64,
    /// Why this host, for the logs.
    pub reasons: String,
}

/// Why no host could take the sandbox.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no host can fit {cpus} vCPU / {memory_mib} MiB: {why}")]
pub struct NoFit {
    pub cpus: u32,
    pub memory_mib: u64,
    pub why: String,
}

// Load is worth up to 100 points, so locality outweighs a load difference
// of up to 60 (warm pool), 20 (template) or 10 (image cache) percentage
// points: a cached image must not pull every sandbox onto one host.
const WARM_POOL: f64 = 60.0;
const TEMPLATE: f64 = 20.0;
const IMAGE_CACHED: f64 = 10.0;
const LOAD: f64 = 100.0;

/// Picks the best host for `demand`.
pub fn place(
    demand: &Demand,
    hosts: &[HostView],
    policy: Policy,
    over: Overcommit,
) -> Result<Decision, NoFit> {
    let mut best: Option<(usize, f64)> = None;
    let (mut not_ready, mut no_caps, mut no_cpu, mut no_mem) = (0, 0, 0, 0);
    for (i, h) in hosts.iter().enumerate() {
        if !h.ready {
            not_ready += 1;
            continue;
        }
        if !demand
            .capabilities
            .iter()
            .all(|c| h.capabilities.contains(c))
        {
            no_caps += 1;
            continue;
        }
        let cpu_cap = h.cpus as f64 * over.cpu;
        let mem_cap = h.memory_mib as f64 * over.memory;
        let cpu_after = (h.cpus_allocated + demand.cpus) as f64;
        let mem_after = (h.memory_allocated_mib + demand.memory_mib) as f64;
        if cpu_after > cpu_cap {
            no_cpu += 1;
            continue;
        }
        if mem_after > mem_cap {
            no_mem += 1;
            continue;
        }
        let load = (cpu_after / cpu_cap).max(mem_after / mem_cap);
        let score = score_of(h, load, policy);
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    match best {
        Some((i, score)) => Ok(Decision {
            host: i,
            score,
            reasons: reasons(&hosts[i], demand, policy, over),
        }),
        None => {
            let mut why = String::new();
            if hosts.is_empty() {
                why.push_str("no host is registered");
            }
            for (n, what) in [
                (not_ready, "not ready (lost or draining)"),
                (no_caps, "lacking a required capability"),
                (no_cpu, "out of vCPUs"),
                (no_mem, "out of memory"),
            ] {
                if n > 0 {
                    if !why.is_empty() {
                        why.push_str(", ");
                    }
                    let _ = write!(why, "{n} host(s) {what}");
                }
            }
            Err(NoFit {
                cpus: demand.cpus,
                memory_mib: demand.memory_mib,
                why,
            })
        }
    }
}

fn score_of(h: &HostView, load: f64, policy: Policy) -> f64 {
    let mut s = 0.0;
    if h.warm_pool_ready {
        s += WARM_POOL;
    }
    if h.has_template {
        s += TEMPLATE;
    }
    if h.image_cached {
        s += IMAGE_CACHED;
    }
    s + match policy {
        Policy::Spread => (1.0 - load) * LOAD,
        Policy::Pack => load * LOAD,
    }
}

fn reasons(h: &HostView, d: &Demand, policy: Policy, over: Overcommit) -> String {
    let mut r = format!(
        "host {}: fits ({}+{} of {:.0} vCPU, {}+{} of {:.0} MiB)",
        h.id,
        h.cpus_allocated,
        d.cpus,
        h.cpus as f64 * over.cpu,
        h.memory_allocated_mib,
        d.memory_mib,
        h.memory_mib as f64 * over.memory
    );
    if h.warm_pool_ready {
        r.push_str(", warm-pool VM ready");
    }
    if h.has_template {
        r.push_str(", template present");
    }
    if h.image_cached {
        r.push_str(", image cached");
    }
    let _ = write!(r, ", {policy:?} policy");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, alloc_cpus: u32, alloc_mem: u64) -> HostView {
        HostView {
            id: id.into(),
            ready: true,
            cpus: 4,
            memory_mib: 8192,
            cpus_allocated: alloc_cpus,
            memory_allocated_mib: alloc_mem,
            ..Default::default()
        }
    }

    fn demand(cpus: u32, mem: u64) -> Demand {
        Demand {
            cpus,
            memory_mib: mem,
            capabilities: vec![],
        }
    }

    #[test]
    fn spread_and_pack_choose_opposite_ends() {
        let hosts = vec![host("a", 2, 4096), host("b", 0, 0), host("c", 1, 1024)];
        let over = Overcommit::default();
        assert_eq!(
            place(&demand(1, 512), &hosts, Policy::Spread, over)
                .unwrap()
                .host,
            1
        );
        assert_eq!(
            place(&demand(1, 512), &hosts, Policy::Pack, over)
                .unwrap()
                .host,
            0
        );
    }

    #[test]
    fn locality_beats_load() {
        let mut hosts = vec![host("a", 1, 1024), host("b", 0, 0)];
        hosts[0].has_template = true;
        let d = place(
            &demand(1, 512),
            &hosts,
            Policy::Spread,
            Overcommit::default(),
        )
        .unwrap();
        assert_eq!(d.host, 0);
        assert!(d.reasons.contains("template"), "{}", d.reasons);
        hosts[1].warm_pool_ready = true;
        assert_eq!(
            place(
                &demand(1, 512),
                &hosts,
                Policy::Spread,
                Overcommit::default()
            )
            .unwrap()
            .host,
            1
        );
    }

    #[test]
    fn a_cached_image_does_not_outweigh_spreading() {
        // 12.5 points of load apart: spreading wins over the cache...
        let mut hosts = vec![host("a", 2, 1024), host("b", 0, 0)];
        hosts[0].image_cached = true;
        let d = place(
            &demand(1, 512),
            &hosts,
            Policy::Spread,
            Overcommit::default(),
        )
        .unwrap();
        assert_eq!(d.host, 1, "{}", d.reasons);
        // ...6.25 points apart: the cache breaks the near-tie.
        hosts[0] = HostView {
            image_cached: true,
            ..host("a", 1, 512)
        };
        assert_eq!(
            place(
                &demand(1, 512),
                &hosts,
                Policy::Spread,
                Overcommit::default()
            )
            .unwrap()
            .host,
            0
        );
    }

    #[test]
    fn capacity_capabilities_and_readiness_are_hard_limits() {
        let mut hosts = vec![host("a", 0, 8000), host("b", 16, 0)];
        let over = Overcommit::default();
        let err = place(&demand(1, 512), &hosts, Policy::Spread, over).unwrap_err();
        assert!(
            err.why.contains("out of memory") && err.why.contains("out of vCPUs"),
            "{err}"
        );
        hosts.push(host("c", 0, 0));
        hosts[2].ready = false;
        let err = place(&demand(1, 512), &hosts, Policy::Spread, over).unwrap_err();
        assert!(err.why.contains("not ready"), "{err}");
        hosts[2].ready = true;
        let gpu = Demand {
            capabilities: vec!["gpu".into()],
            ..demand(1, 512)
        };
        assert!(
            place(&gpu, &hosts, Policy::Spread, over)
                .unwrap_err()
                .why
                .contains("capability")
        );
        hosts[2].capabilities = vec!["gpu".into()];
        assert_eq!(place(&gpu, &hosts, Policy::Spread, over).unwrap().host, 2);
        assert!(
            place(&demand(1, 1), &[], Policy::Spread, over)
                .unwrap_err()
                .why
                .contains("no host")
        );
    }

    #[test]
    fn overcommit_ratios_apply() {
        let hosts = vec![host("a", 15, 0)];
        let d = demand(1, 512);
        assert!(
            place(
                &d,
                &hosts,
                Policy::Spread,
                Overcommit {
                    cpu: 4.0,
                    memory: 1.0
                }
            )
            .is_ok()
        );
        assert!(
            place(
                &d,
                &hosts,
                Policy::Spread,
                Overcommit {
                    cpu: 1.0,
                    memory: 1.0
                }
            )
            .is_err()
        );
    }
}
