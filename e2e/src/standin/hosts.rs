//! Name resolution for pods run by the stand-in kubelet. There is no cluster DNS here, so each pod
//! gets its own hosts file (bind-mounted at `/etc/hosts` in its containers, as the kubelet
//! manages a pod's /etc/hosts), holding this machine's entries, the pod's own names, and the DNS
//! names that cluster DNS would serve for pods behind headless Services:
//! `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]` for every pod whose `subdomain` names
//! a headless Service of its namespace, once it is Ready (or at once if the Service publishes
//! not-ready addresses). Files are rewritten in place when pods or Services change, so running
//! containers see new names, as they would see new DNS records.

use std::collections::BTreeMap;
use std::io::{Seek as _, Write as _};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct PodAddress {
    pub namespace: String,
    pub hostname: String,
    pub subdomain: Option<String>,
    pub ip: String,
    pub ready: bool,
    pub hosts_file: PathBuf,
}

#[derive(Default)]
pub struct HostsBook {
    base: String,
    pods: BTreeMap<String, PodAddress>,
    /// Headless Services: (namespace, name) → publishNotReadyAddresses.
    services: BTreeMap<(String, String), bool>,
    written: BTreeMap<String, String>,
}

pub const DOMAIN: &str = "cluster.local";

impl HostsBook {
    /// `base`: this machine's hosts file, which every pod's file starts with.
    pub fn new(base: String) -> HostsBook {
        HostsBook {
            base,
            ..Default::default()
        }
    }

    pub fn set_pod(&mut self, uid: &str, address: PodAddress) {
        self.pods.insert(uid.to_string(), address);
        self.sync();
    }

    pub fn set_ready(&mut self, uid: &str, ready: bool) {
        if let Some(p) = self.pods.get_mut(uid) {
            if p.ready != ready {
                p.ready = ready;
                self.sync();
            }
        }
    }

    pub fn remove_pod(&mut self, uid: &str) {
        if self.pods.remove(uid).is_some() {
            self.written.remove(uid);
            self.sync();
        }
    }

    /// A Service appeared or changed; `headless` false (or a removal) takes its names away.
    pub fn set_service(&mut self, namespace: &str, name: &str, headless: Option<bool>) {
        let key = (namespace.to_string(), name.to_string());
        let changed = match headless {
            Some(publish_not_ready) => {
                self.services.insert(key, publish_not_ready) != Some(publish_not_ready)
            }
            None => self.services.remove(&key).is_some(),
        };
        if changed {
            self.sync();
        }
    }

    fn names(p: &PodAddress) -> Vec<String> {
        match &p.subdomain {
            Some(sub) => {
                let svc = format!("{}.{sub}.{}.svc", p.hostname, p.namespace);
                vec![
                    format!("{svc}.{DOMAIN}"),
                    svc,
                    format!("{}.{sub}.{}", p.hostname, p.namespace),
                    format!("{}.{sub}", p.hostname),
                ]
            }
            None => vec![],
        }
    }

    fn published(&self, p: &PodAddress) -> bool {
        let Some(sub) = &p.subdomain else {
            return false;
        };
        match self.services.get(&(p.namespace.clone(), sub.clone())) {
            Some(publish_not_ready) => p.ready || *publish_not_ready,
            None => false,
        }
    }

    /// The hosts file of pod `uid`.
    pub fn render(&self, uid: &str) -> Option<String> {
        let me = self.pods.get(uid)?;
        let mut out = self.base.trim_end().to_string();
        out.push_str("\n\n# Managed by the stand-in kubelet (test-only): this pod's names.\n");
        let mut own = Self::names(me);
        own.push(me.hostname.clone());
        out.push_str(&format!("{}\t{}\n", me.ip, own.join(" ")));
        out.push_str("# Pods behind headless Services, as cluster DNS would answer.\n");
        for (other_uid, p) in &self.pods {
            if other_uid != uid && self.published(p) {
                out.push_str(&format!("{}\t{}\n", p.ip, Self::names(p).join(" ")));
            }
        }
        Some(out)
    }

    fn sync(&mut self) {
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            let Some(text) = self.render(&uid) else {
                continue;
            };
            if self.written.get(&uid) == Some(&text) {
                continue;
            }
            let path = self.pods[&uid].hosts_file.clone();
            match write_in_place(&path, &text) {
                Ok(()) => {
                    self.written.insert(uid, text);
                }
                Err(e) => tracing::warn!("writing {}: {e}", path.display()),
            }
        }
    }
}

/// Rewrites the file's contents without replacing the file: a bind mount holds on to the inode,
/// so a new file would not be seen by running containers.
fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    f.write_all(text.as_bytes())?;
    f.set_len(text.len() as u64)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(dir: &Path, host: &str, ip: &str, ready: bool) -> PodAddress {
        PodAddress {
            namespace: "ns".into(),
            hostname: host.into(),
            subdomain: Some("t-workers".into()),
            ip: ip.into(),
            ready,
            hosts_file: dir.join(host),
        }
    }

    #[test]
    fn names_appear_once_the_headless_service_exists_and_the_pod_is_ready() {
        let dir = std::env::temp_dir().join(format!("standin-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut book = HostsBook::new("127.0.0.1 localhost\n".into());
        book.set_pod("a", addr(&dir, "t-worker-0", "127.0.0.2", false));
        book.set_pod("b", addr(&dir, "t-worker-1", "127.0.0.3", false));
        let b = std::fs::read_to_string(dir.join("t-worker-1")).unwrap();
        assert!(b.starts_with("127.0.0.1 localhost\n"));
        assert!(b.contains("127.0.0.3\tt-worker-1.t-workers.ns.svc.cluster.local"));
        assert!(!b.contains("127.0.0.2"), "no Service yet: {b}");

        book.set_service("ns", "t-workers", Some(false));
        assert!(!std::fs::read_to_string(dir.join("t-worker-1"))
            .unwrap()
            .contains("127.0.0.2"));
        book.set_ready("a", true);
        let b = std::fs::read_to_string(dir.join("t-worker-1")).unwrap();
        assert!(b.contains(
            "127.0.0.2\tt-worker-0.t-workers.ns.svc.cluster.local t-worker-0.t-workers.ns.svc"
        ));

        book.set_service("ns", "t-workers", None);
        book.set_service("ns", "t-workers", Some(true));
        assert!(std::fs::read_to_string(dir.join("t-worker-0"))
            .unwrap()
            .contains("127.0.0.3"));
        book.remove_pod("b");
        let a = std::fs::read_to_string(dir.join("t-worker-0")).unwrap();
        assert!(!a.contains("127.0.0.3"), "{a}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
