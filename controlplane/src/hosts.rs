//! The hosts this control-plane replica can reach right now (in-process or
//! through their tunnels), with what they last reported.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::host::Host;

#[derive(Clone)]
pub(crate) struct Connected {
    pub host: Arc<dyn Host>,
    /// The last `Info` report.
    pub info: Option<somna_proto::v1::Host>,
    /// When the host last answered.
    pub last_ok: Instant,
}

#[derive(Default)]
pub(crate) struct HostRegistry {
    map: RwLock<HashMap<String, Connected>>,
}

impl HostRegistry {
    /// Adds or replaces (a reconnecting agent) a host.
    pub fn attach(&self, host: Arc<dyn Host>) {
        let id = host.id().to_string();
        self.write().insert(
            id,
            Connected {
                host,
                info: None,
                last_ok: Instant::now(),
            },
        );
    }

    pub fn get(&self, id: &str) -> Option<Arc<dyn Host>> {
        self.read().get(id).map(|c| c.host.clone())
    }

    pub fn all(&self) -> Vec<Connected> {
        self.read().values().cloned().collect()
    }

    /// Records a successful report, unless the host was replaced meanwhile.
    pub fn reported(&self, host: &Arc<dyn Host>, info: somna_proto::v1::Host) {
        if let Some(c) = self.write().get_mut(host.id())
            && Arc::ptr_eq(&c.host, host)
        {
            c.info = Some(info);
            c.last_ok = Instant::now();
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Connected>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Connected>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}
