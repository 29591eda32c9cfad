//! Blocked network addresses: containment's "stop this address
//! everywhere" (`phylax incident contain --ip`, `phylax incident unblock`).
//!
//! Each block or unblock is an entry of its own in the instance metadata
//! (`blocked_ip:{address}:{ms}`, written once and never changed), so the
//! history stays; the newest entry for an address decides. Every node
//! rereads the list with the revocation feed (every few seconds) and
//! refuses every request from a blocked address before any handler runs,
//! sign-in and token endpoints included.

use phylax_store::{MetaStore, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

const PREFIX: &str = "blocked_ip:";

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    blocked: bool,
    /// The incident that called for it.
    #[serde(default)]
    incident: Option<String>,
}

/// An IPv4 address mapped into IPv6 is the IPv4 address (a dual-stack
/// listener sees IPv4 clients so).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The blocked addresses, as every node holds them.
#[derive(Debug, Clone)]
pub struct Blocks {
    store: Arc<dyn MetaStore>,
    set: Arc<parking_lot::RwLock<HashSet<IpAddr>>>,
}

impl Blocks {
    pub fn new(store: Arc<dyn MetaStore>) -> Blocks {
        Blocks {
            store,
            set: Arc::default(),
        }
    }

    /// Is `ip` blocked (as of the last refresh)?
    pub fn refuses(&self, ip: IpAddr) -> bool {
        let set = self.set.read();
        !set.is_empty() && set.contains(&canonical(ip))
    }

    /// Block `ip` on every node (within the refresh interval; at once on
    /// this one).
    pub async fn block(
        &self,
        ip: IpAddr,
        incident: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.put(ip, true, incident, now_ms).await?;
        self.set.write().insert(canonical(ip));
        Ok(())
    }

    /// Lift a block.
    pub async fn unblock(&self, ip: IpAddr, now_ms: i64) -> Result<(), StoreError> {
        self.put(ip, false, None, now_ms).await?;
        self.set.write().remove(&canonical(ip));
        Ok(())
    }

    async fn put(
        &self,
        ip: IpAddr,
        blocked: bool,
        incident: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let e = Entry {
            blocked,
            incident: incident.map(str::to_owned),
        };
        let v = serde_json::to_vec(&e).map_err(|e| StoreError::Backend(e.to_string()))?;
        // A second entry in the same millisecond gets the next one: each
        // entry is written once.
        let mut at = now_ms;
        loop {
            let key = format!("{PREFIX}{}:{at:016}", canonical(ip));
            if self.store.put_meta_if_absent(&key, &v).await? == v {
                return Ok(());
            }
            at += 1;
        }
    }

    /// Reread the list (the newest entry per address decides).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let set = self.load().await?;
        *self.set.write() = set;
        Ok(())
    }

    /// The addresses blocked now.
    pub async fn load(&self) -> Result<HashSet<IpAddr>, StoreError> {
        let mut newest: HashMap<IpAddr, (String, bool)> = HashMap::new();
        for (k, v) in self.store.meta_with_prefix(PREFIX).await? {
            let Some((addr, at)) = k[PREFIX.len()..].rsplit_once(':') else {
                continue;
            };
            let (Ok(ip), Ok(e)) = (addr.parse::<IpAddr>(), serde_json::from_slice::<Entry>(&v))
            else {
                continue;
            };
            let ip = canonical(ip);
            let at = at.to_owned();
            match newest.get(&ip) {
                Some((t, _)) if *t >= at => {}
                _ => {
                    newest.insert(ip, (at, e.blocked));
                }
            }
        }
        Ok(newest
            .into_iter()
            .filter(|(_, (_, b))| *b)
            .map(|(ip, _)| ip)
            .collect())
    }
}
