//! What a control-plane replica knows about apps beyond the store: the
//! ingress's address (for URLs), cached routes, requests in flight per
//! replica, per-app deploy locks and scale-ups in progress.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a cached route is used before it is read from the store again
/// (apps deployed through another control-plane replica show up then).
pub(crate) const ROUTE_TTL: Duration = Duration::from_secs(2);

/// Where the ingress of this control plane answers.
#[derive(Debug, Clone)]
pub struct IngressAddr {
    pub scheme: &'static str,
    pub domain: String,
    pub port: u16,
}

/// An app as the ingress routes it.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub name: String,
    pub port: u16,
    pub target_in_flight: u32,
    pub max_replicas: u32,
    /// Serving replicas.
    pub replicas: Vec<RouteReplica>,
}

#[derive(Debug, Clone)]
pub(crate) struct RouteReplica {
    pub id: String,
    pub host: String,
    /// Running when last seen (else asleep or waking).
    pub awake: bool,
}

#[derive(Default)]
pub(crate) struct Runtime {
    ingress: Mutex<Option<IngressAddr>>,
    routes: Mutex<HashMap<String, (Instant, Arc<Route>)>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
    last_request: Mutex<HashMap<String, Instant>>,
    deploys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    scaling: Mutex<HashSet<String>>,
    health_failures: Mutex<HashMap<String, u32>>,
    stopping: std::sync::atomic::AtomicBool,
    /// Replicas whose app answered (also labelled in the store; this copy
    /// survives a concurrent heartbeat write of the row's older labels).
    ready: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One request in flight on a replica; dropping it ends the request.
pub(crate) struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A scale-up of one app in progress; dropping it allows the next.
pub(crate) struct Scaling<'a> {
    runtime: &'a Runtime,
    app: String,
}

impl Drop for Scaling<'_> {
    fn drop(&mut self) {
        lock(&self.runtime.scaling).remove(&self.app);
    }
}

impl Runtime {
    /// The platform is shutting down: replicas are about to be destroyed on
    /// purpose, so nothing may replace them.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
    pub(crate) fn set_ingress(&self, addr: IngressAddr) {
        *lock(&self.ingress) = Some(addr);
    }

    pub(crate) fn domain(&self) -> Option<String> {
        lock(&self.ingress).as_ref().map(|a| a.domain.clone())
    }

    /// The app's URL on this control plane's ingress ("" without one).
    pub(crate) fn url(&self, name: &str) -> String {
        match &*lock(&self.ingress) {
            Some(a) => {
                let default = matches!((a.scheme, a.port), ("http", 80) | ("https", 443));
                if default {
                    format!("{}://{name}.{}/", a.scheme, a.domain)
                } else {
                    format!("{}://{name}.{}:{}/", a.scheme, a.domain, a.port)
                }
            }
            None => String::new(),
        }
    }

    pub(crate) fn cached_route(&self, name: &str) -> Option<Arc<Route>> {
        lock(&self.routes)
            .get(name)
            .filter(|(at, _)| at.elapsed() < ROUTE_TTL)
            .map(|(_, r)| r.clone())
    }

    pub(crate) fn put_route(&self, route: Route) -> Arc<Route> {
        let route = Arc::new(route);
        lock(&self.routes).insert(route.name.clone(), (Instant::now(), route.clone()));
        route
    }

    pub(crate) fn forget_route(&self, name: &str) {
        lock(&self.routes).remove(name);
    }

    fn counter(&self, id: &str) -> Arc<AtomicU32> {
        lock(&self.in_flight)
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    pub(crate) fn in_flight(&self, id: &str) -> u32 {
        lock(&self.in_flight)
            .get(id)
            .map(|c| c.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Picks the replica of `route` for a new request: awake before
    /// asleep, then the fewest requests in flight; counts the request.
    pub(crate) fn pick(&self, route: &Route) -> Option<(RouteReplica, InFlight)> {
        let map = lock(&self.in_flight);
        let load = |id: &str| map.get(id).map(|c| c.load(Ordering::SeqCst)).unwrap_or(0);
        let replica = route
            .replicas
            .iter()
            .min_by_key(|r| (!r.awake, load(&r.id)))?
            .clone();
        drop(map);
        let counter = self.counter(&replica.id);
        counter.fetch_add(1, Ordering::SeqCst);
        lock(&self.last_request).insert(replica.id.clone(), Instant::now());
        Some((replica, InFlight(counter)))
    }

    /// Whether the route's replicas carry more than their target load.
    pub(crate) fn overloaded(&self, route: &Route) -> bool {
        let total: u32 = route.replicas.iter().map(|r| self.in_flight(&r.id)).sum();
        let n = route.replicas.len().max(1) as u32;
        (route.replicas.len() as u32) < route.max_replicas && total > route.target_in_flight * n
    }

    /// When the replica last got a request through this ingress.
    pub(crate) fn last_request(&self, id: &str) -> Option<Instant> {
        lock(&self.last_request).get(id).copied()
    }

    pub(crate) fn set_ready(&self, id: &str) {
        lock(&self.ready).insert(id.to_string());
    }

    pub(crate) fn is_ready(&self, id: &str) -> bool {
        lock(&self.ready).contains(id)
    }

    pub(crate) fn forget_replica(&self, id: &str) {
        lock(&self.ready).remove(id);
        lock(&self.in_flight).remove(id);
        lock(&self.last_request).remove(id);
        lock(&self.health_failures).remove(id);
    }

    pub(crate) fn deploy_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.deploys)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Starts a scale-up of `app` unless one is running.
    pub(crate) fn begin_scaling(&self, app: &str) -> Option<Scaling<'_>> {
        lock(&self.scaling)
            .insert(app.to_string())
            .then(|| Scaling {
                runtime: self,
                app: app.to_string(),
            })
    }

    /// Counts a failed health check; returns the failures in a row.
    pub(crate) fn health_failed(&self, id: &str) -> u32 {
        let mut m = lock(&self.health_failures);
        let n = m.entry(id.to_string()).or_default();
        *n += 1;
        *n
    }

    pub(crate) fn health_ok(&self, id: &str) {
        lock(&self.health_failures).remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(replicas: &[(&str, bool)]) -> Route {
        Route {
            name: "web".into(),
            port: 80,
            target_in_flight: 1,
            max_replicas: 3,
            replicas: replicas
                .iter()
                .map(|(id, awake)| RouteReplica {
                    id: id.to_string(),
                    host: "h".into(),
                    awake: *awake,
                })
                .collect(),
        }
    }

    #[test]
    fn picks_awake_then_least_loaded_and_counts() {
        let rt = Runtime::default();
        let r = route(&[("asleep", false), ("a", true), ("b", true)]);
        let first = rt.pick(&r).map(|(r, g)| (r.id, g)).unwrap();
        let (first, g1) = first;
        assert_ne!(first, "asleep");
        let (second, g2) = rt.pick(&r).map(|(r, g)| (r.id, g)).unwrap();
        assert_ne!(second, first, "the less loaded awake replica");
        assert_ne!(second, "asleep");
        assert_eq!(rt.in_flight(&first), 1);
        drop((g1, g2));
        assert_eq!(rt.in_flight(&first), 0);
        assert!(rt.last_request(&first).is_some());
    }

    #[test]
    fn overloaded_only_below_max() {
        let rt = Runtime::default();
        let r = route(&[("a", true)]);
        let _g: Vec<_> = (0..2).map(|_| rt.pick(&r).unwrap().1).collect();
        assert!(
            rt.overloaded(&r),
            "2 in flight > target 1 with room to grow"
        );
        let full = Route {
            max_replicas: 1,
            ..r
        };
        assert!(!rt.overloaded(&full), "at max_replicas");
    }

    #[test]
    fn urls() {
        let rt = Runtime::default();
        assert_eq!(rt.url("web"), "");
        rt.set_ingress(IngressAddr {
            scheme: "http",
            domain: "localhost".into(),
            port: 7478,
        });
        assert_eq!(rt.url("web"), "http://web.localhost:7478/");
        rt.set_ingress(IngressAddr {
            scheme: "https",
            domain: "apps.example.com".into(),
            port: 443,
        });
        assert_eq!(rt.url("web"), "https://web.apps.example.com/");
    }
}
