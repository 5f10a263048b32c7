//! Which host each sandbox lives on, and the sandbox's lifetime.
//!
//! Placement today is "the first registered host": `somna up` has exactly
//! one. Scoring hosts (capacity, warm pools, image locality) comes with the
//! scheduler.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::task::AbortHandle;

use crate::host::Host;

pub(crate) struct Placement {
    pub host: Arc<dyn Host>,
    pub expires_at: Option<SystemTime>,
    /// The task that destroys the sandbox when it expires.
    timer: Option<AbortHandle>,
}

#[derive(Default)]
pub(crate) struct Registry {
    hosts: Vec<Arc<dyn Host>>,
    sandboxes: Mutex<HashMap<String, Placement>>,
}

impl Registry {
    pub fn new(hosts: Vec<Arc<dyn Host>>) -> Self {
        Registry {
            hosts,
            sandboxes: Mutex::new(HashMap::new()),
        }
    }

    pub fn hosts(&self) -> &[Arc<dyn Host>] {
        &self.hosts
    }

    /// The host a new sandbox goes to.
    pub fn place(&self) -> Option<Arc<dyn Host>> {
        self.hosts.first().cloned()
    }

    pub fn insert(
        &self,
        id: String,
        host: Arc<dyn Host>,
        expires_at: Option<SystemTime>,
        timer: Option<AbortHandle>,
    ) {
        self.map().insert(
            id,
            Placement {
                host,
                expires_at,
                timer,
            },
        );
    }

    pub fn host_of(&self, id: &str) -> Option<Arc<dyn Host>> {
        self.map().get(id).map(|p| p.host.clone())
    }

    pub fn expires_at(&self, id: &str) -> Option<SystemTime> {
        self.map().get(id).and_then(|p| p.expires_at)
    }

    /// Forgets a sandbox and cancels its expiry timer (unless the timer is
    /// the caller).
    pub fn remove(&self, id: &str, cancel_timer: bool) {
        if let Some(p) = self.map().remove(id)
            && cancel_timer
            && let Some(t) = p.timer
        {
            t.abort();
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Placement>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The largest sandbox timeout accepted (30 days).
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
