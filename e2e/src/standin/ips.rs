//! Pod addresses: each pod run here gets a loopback address of its own (127.0.0.2, 127.0.0.3, ...),
//! which every process on this machine can reach, so a pod's servers bind their own address and
//! two pods can use the same port. Freed addresses are handed out again only after the rest of
//! the range, as a CNI plugin avoids quick reuse.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

pub struct IpPool {
    /// Offsets from 127.0.0.0; .0 and .255 of each /24 are skipped, and 127.0.0.1 is the host's.
    next: u32,
    by_pod: BTreeMap<String, u32>,
    used: BTreeSet<u32>,
}

const FIRST: u32 = 2;
const LAST: u32 = (1 << 16) - 2; // 127.0.255.254

impl Default for IpPool {
    fn default() -> Self {
        IpPool {
            next: FIRST,
            by_pod: BTreeMap::new(),
            used: BTreeSet::new(),
        }
    }
}

impl IpPool {
    /// The address of pod `uid` (the same one again if it has one).
    pub fn allocate(&mut self, uid: &str) -> Option<Ipv4Addr> {
        if let Some(o) = self.by_pod.get(uid) {
            return Some(addr(*o));
        }
        for _ in FIRST..=LAST {
            let candidate = self.next;
            self.next = if self.next >= LAST {
                FIRST
            } else {
                self.next + 1
            };
            let last_octet = candidate & 0xff;
            if last_octet == 0 || last_octet == 255 || self.used.contains(&candidate) {
                continue;
            }
            self.used.insert(candidate);
            self.by_pod.insert(uid.to_string(), candidate);
            return Some(addr(candidate));
        }
        None
    }

    pub fn release(&mut self, uid: &str) {
        if let Some(o) = self.by_pod.remove(uid) {
            self.used.remove(&o);
        }
    }
}

fn addr(offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_stable_and_not_reused_at_once() {
        let mut pool = IpPool::default();
        let a = pool.allocate("a").unwrap();
        let b = pool.allocate("b").unwrap();
        assert_eq!(a, Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(b, Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(pool.allocate("a").unwrap(), a);
        pool.release("a");
        assert_eq!(pool.allocate("c").unwrap(), Ipv4Addr::new(127, 0, 0, 4));
        for i in 0..300 {
            let ip = pool.allocate(&format!("p{i}")).unwrap();
            assert!(ip.octets()[3] != 0 && ip.octets()[3] != 255, "{ip}");
        }
    }
}
