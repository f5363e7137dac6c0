//! Watches a process's sockets for peers off this machine. Test traffic may go only to loopback
//! or to network namespaces the run made itself, so the suite starts every operator under a watch
//! and fails the test whose operator ever had a connection anywhere else.
//!
//! The kernel's own tables are read, not the operator's logs or metrics: `/proc/PID/fd` names
//! the process's sockets and `/proc/PID/net/{tcp,tcp6,udp,udp6}` their peers, every
//! `SAMPLE_EVERY`. A dial to an address where nothing answers sits in SYN_SENT for the client's
//! whole connect timeout and a pooled HTTP connection stays open for seconds, so a sample this
//! frequent sees both; only an exchange that opens and closes within one interval could slip by.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;

pub const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Loopback in both families (and IPv4 loopback written as IPv6), plus what
/// `CHARLM_E2E_ALLOWED_NETWORKS` adds (comma-separated CIDRs: a bridge the run created).
pub fn allowed_networks() -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = ["127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    if let Ok(extra) = std::env::var("CHARLM_E2E_ALLOWED_NETWORKS") {
        for item in extra.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            nets.push(
                item.parse().unwrap_or_else(|_| {
                    panic!("CHARLM_E2E_ALLOWED_NETWORKS: {item:?} is not a CIDR")
                }),
            );
        }
    }
    nets
}

/// One socket of the table: its inode, peer and TCP state (`None` for UDP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketEntry {
    pub inode: u64,
    pub peer: SocketAddr,
    pub state: Option<&'static str>,
}

/// Parses one of `/proc/net/{tcp,tcp6,udp,udp6}`: the header line, then one socket a line.
pub fn parse_table(text: &str, tcp: bool) -> Vec<SocketEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let peer = parse_addr(fields.get(2)?)?;
            let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            Some(SocketEntry {
                inode,
                peer,
                state: tcp.then(|| tcp_state(state)),
            })
        })
        .collect()
}

/// `0100007F:1F90` is 127.0.0.1:8080: the kernel prints each 32-bit word of the address as the
/// host reads it, so the bytes come back in order through the host's own byte order.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
        .map(|i| {
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()
                .map(u32::to_ne_bytes)
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn tcp_state(code: u8) -> &'static str {
    match code {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0A => "LISTEN",
        0x0B => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// The peers of `pid`'s sockets that are outside `allowed`, one line each
/// (`tcp 10.244.0.5:9090 SYN_SENT`). Listening and unconnected sockets have no peer.
pub fn off_machine_peers(pid: u32, allowed: &[IpNet]) -> std::io::Result<Vec<String>> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    let mut found = Vec::new();
    for (table, tcp) in [
        ("tcp", true),
        ("tcp6", true),
        ("udp", false),
        ("udp6", false),
    ] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for entry in parse_table(&text, tcp) {
            if !inodes.contains(&entry.inode)
                || entry.peer.ip().is_unspecified()
                || allowed.iter().any(|n| n.contains(&entry.peer.ip()))
            {
                continue;
            }
            found.push(format!(
                "{table} {} {}",
                entry.peer,
                entry.state.unwrap_or("")
            ));
        }
    }
    Ok(found)
}

/// A background sampler of one process's peers; stops when dropped or when the process is gone.
pub struct TrafficWatch {
    seen: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
}

impl TrafficWatch {
    pub fn start(pid: u32, allowed: Vec<IpNet>) -> TrafficWatch {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen_w, stop_w) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop_w.load(Ordering::Relaxed) {
                match off_machine_peers(pid, &allowed) {
                    Ok(found) => seen_w.lock().unwrap().extend(found),
                    Err(_) => return, // the process has ended
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        TrafficWatch { seen, stop }
    }

    /// Every off-machine peer seen so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().cloned().collect()
    }
}

impl Drop for TrafficWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernel_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
0: 0100007F:3E8B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   \
1: 0100007F:C350 0500F40A:2382 02 00000001:00000000 01:00000064 00000002     0        0 4343 2 0 100 0 0 10 -1\n";
        let entries = parse_table(tcp, true);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].state, Some("LISTEN"));
        assert_eq!(entries[1].peer, "10.244.0.5:9090".parse().unwrap());
        assert_eq!(
            (entries[1].inode, entries[1].state),
            (4343, Some("SYN_SENT"))
        );
        let tcp6 = "  sl  local_address                         remote_address                        st\n   \
0: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 77 1\n";
        let entries = parse_table(tcp6, true);
        assert_eq!(entries[0].peer, "[::ffff:127.0.0.1]:54321".parse().unwrap());
    }

    /// The watch sees a live connection of this very process: with only 127.0.0.1 allowed, a
    /// connection to 127.0.0.2 (loopback still, so nothing leaves the machine) is reported.
    #[test]
    fn a_connection_outside_the_allowed_networks_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pid = std::process::id();
        let only_one: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let watch = TrafficWatch::start(pid, only_one.clone());
        let stream = std::net::TcpStream::connect(addr).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while watch.seen().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(SAMPLE_EVERY);
        }
        let seen = watch.seen();
        assert!(
            seen.iter().any(|s| s.starts_with(&format!("tcp {addr} "))),
            "{seen:?}"
        );
        // Loopback as a whole is allowed: the same connection is not off the machine.
        assert!(off_machine_peers(pid, &allowed_networks())
            .unwrap()
            .is_empty());
        drop(stream);
    }
}
