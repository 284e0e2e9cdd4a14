//! The global environment layer (contract §6.4, §5.4): internal variables plus the
//! `envVars` of the last `/init`. Every process and kernel sees it; kernels watch it
//! for changes and re-apply it.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// A snapshot of the global environment.
pub type EnvMap = Arc<BTreeMap<String, String>>;

/// The (internal, user) parts of the global environment.
type Parts = (BTreeMap<String, String>, BTreeMap<String, String>);

/// Shared handle to the global environment. Cloning shares the same value.
#[derive(Clone)]
pub struct GlobalEnv {
    /// (internal, user) parts; the published map is user overlaid by internal.
    parts: Arc<std::sync::Mutex<Parts>>,
    tx: Arc<watch::Sender<EnvMap>>,
}

impl GlobalEnv {
    /// A global environment with fixed internal variables and an empty user part.
    pub fn new(internal: BTreeMap<String, String>) -> Self {
        let (tx, _rx) = watch::channel(Arc::new(internal.clone()));
        GlobalEnv {
            parts: Arc::new(std::sync::Mutex::new((internal, BTreeMap::new()))),
            tx: Arc::new(tx),
        }
    }

    /// The current variables (user part overlaid by the internal ones).
    pub fn snapshot(&self) -> EnvMap {
        self.tx.borrow().clone()
    }

    /// The current variables as pairs, in key order.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.snapshot()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Replaces the user part (keys not given are removed); internal keys cannot be
    /// overridden. Watchers are notified only when the result differs.
    pub fn replace_user_vars(&self, vars: BTreeMap<String, String>) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        parts.1 = vars;
        self.publish(&parts);
    }

    /// Sets (or, with `None`, removes) one internal variable.
    pub fn set_internal(&self, key: &str, value: Option<String>) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        match value {
            Some(v) => parts.0.insert(key.to_string(), v),
            None => parts.0.remove(key),
        };
        self.publish(&parts);
    }

    /// The user part alone (what `/init` set).
    pub fn user_vars(&self) -> BTreeMap<String, String> {
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    fn publish(&self, parts: &Parts) {
        let mut merged = parts.1.clone();
        for (k, v) in &parts.0 {
            merged.insert(k.clone(), v.clone());
        }
        self.tx.send_if_modified(|cur| {
            if **cur == merged {
                false
            } else {
                *cur = Arc::new(merged);
                true
            }
        });
    }

    /// Notified whenever the variables change.
    pub fn subscribe(&self) -> watch::Receiver<EnvMap> {
        self.tx.subscribe()
    }
}

/// The internal variables (contract §6.4) that `/init` cannot replace:
/// `E2B_SANDBOX` is `true` in a sandbox VM and `false` in development mode.
pub fn internal_vars_for(in_vm: bool) -> BTreeMap<String, String> {
    BTreeMap::from([("E2B_SANDBOX".to_string(), in_vm.to_string())])
}

/// The internal variables of a sandbox VM.
pub fn internal_vars() -> BTreeMap<String, String> {
    internal_vars_for(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_keys_win_and_replace_removes_old_keys() {
        let env = GlobalEnv::new(BTreeMap::from([("E2B_SANDBOX".into(), "true".into())]));
        env.replace_user_vars(BTreeMap::from([
            ("A".into(), "1".into()),
            ("E2B_SANDBOX".into(), "false".into()),
        ]));
        assert_eq!(
            env.pairs(),
            vec![
                ("A".into(), "1".into()),
                ("E2B_SANDBOX".into(), "true".into())
            ]
        );
        env.replace_user_vars(BTreeMap::from([("B".into(), "2".into())]));
        assert_eq!(
            env.pairs(),
            vec![
                ("B".into(), "2".into()),
                ("E2B_SANDBOX".into(), "true".into())
            ]
        );
    }

    #[tokio::test]
    async fn watchers_see_changes_only() {
        let env = GlobalEnv::new(BTreeMap::new());
        let mut rx = env.subscribe();
        rx.borrow_and_update();
        env.replace_user_vars(BTreeMap::new());
        assert!(!rx.has_changed().unwrap());
        env.replace_user_vars(BTreeMap::from([("X".into(), "y".into())]));
        assert!(rx.has_changed().unwrap());
    }
}
