//! CancelRequest forwarding. Each client gets the proxy's own
//! BackendKeyData; while the client holds a server connection, its slot
//! names that server's key, so a cancel reaches the backend actually
//! running the client's query, and nothing when the client is between
//! transactions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

/// The server backend a client's cancel goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub process_id: i32,
    pub secret_key: i32,
}

type Slot = Arc<Mutex<Option<CancelTarget>>>;

#[derive(Default)]
pub struct Cancels {
    slots: Mutex<HashMap<i32, (i32, Slot)>>,
    next: AtomicI32,
}

/// A client's registration; removed from the registry when dropped.
pub struct CancelKey {
    registry: Arc<Cancels>,
    pub process_id: i32,
    pub secret_key: i32,
    slot: Slot,
}

impl CancelKey {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.slot.lock().expect("cancel slot") = target;
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .slots
            .lock()
            .expect("cancel slots")
            .remove(&self.process_id);
    }
}

impl Cancels {
    /// A fresh key: process ids are unique among live clients, secrets
    /// random, so a client cannot cancel another's queries.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let secret_key: i32 = rand::random();
        let slot: Slot = Arc::new(Mutex::new(None));
        let mut slots = self.slots.lock().expect("cancel slots");
        let process_id = loop {
            // Positive, like a real pid.
            let id = self.next.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & 0x7fff_ffff;
            if id != 0 && !slots.contains_key(&id) {
                break id;
            }
        };
        slots.insert(process_id, (secret_key, slot.clone()));
        CancelKey {
            registry: self.clone(),
            process_id,
            secret_key,
            slot,
        }
    }

    /// Where a cancel with this key should go, if anywhere.
    pub fn lookup(&self, process_id: i32, secret_key: i32) -> Option<CancelTarget> {
        let slots = self.slots.lock().expect("cancel slots");
        let (secret, slot) = slots.get(&process_id)?;
        // Not constant-time: the secret is one of 2^32 and a wrong guess
        // costs a connection, as in PostgreSQL.
        if *secret != secret_key {
            return None;
        }
        slot.lock().expect("cancel slot").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_keys_route_only_with_the_right_secret() {
        let reg = Arc::new(Cancels::default());
        let a = reg.register();
        let b = reg.register();
        assert_ne!(a.process_id, b.process_id);
        let target = CancelTarget {
            host: "h".into(),
            port: 1,
            process_id: 42,
            secret_key: 7,
        };
        assert_eq!(
            reg.lookup(a.process_id, a.secret_key),
            None,
            "no server held"
        );
        a.set(Some(target.clone()));
        assert_eq!(reg.lookup(a.process_id, a.secret_key), Some(target));
        assert_eq!(reg.lookup(a.process_id, a.secret_key.wrapping_add(1)), None);
        let pid = a.process_id;
        drop(a);
        assert_eq!(reg.lookup(pid, 0), None);
    }
}
