//! Test hosts on one machine: each a network namespace joined to the root namespace (where the
//! test's PostgreSQL server listens) by a veth pair of its own, so its processes reach the server
//! only through that link. Taking the link down cuts the host off; its processes live on.
//! Namespace and link are removed when the host is dropped, also when a test fails.
//!
//! Needs root and `ip` (iproute2; `.ci/run` installs it). Shared by the end-to-end suite and the
//! chaos harness (`#[path]`).

#![allow(dead_code)]
// Test hosts die by real signals.
#![allow(clippy::disallowed_methods)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Every test host's address lies in this network (for the server's `pg_hba.conf`).
pub const HOSTS_CIDR: &str = "10.214.0.0/16";

pub struct NetHost {
    pub ns: String,
    root_if: String,
    ns_if: String,
    /// The server's address on this host's link (root side), and the host's own.
    pub server_ip: String,
    pub host_ip: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().is_ok_and(|s| s.success())
}

/// Whether hosts can be made here (root and `ip`); if not, says so loudly: the caller skips.
pub fn available() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root || !Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()) {
        eprintln!(
            "\n*** skipped: needs root for ip netns (and `ip` from iproute2){} ***\n",
            if root { "" } else { "; this is not root" }
        );
        return false;
    }
    true
}

impl NetHost {
    /// A new host, or `None` (after [`available`]'s message) when hosts cannot be made here.
    pub fn create() -> Option<NetHost> {
        if !available() {
            return None;
        }
        // Unique per process (pid) and per host of the process (counter): tests run in threads,
        // and other test processes may make hosts at the same time.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed) % 64;
        let pid = std::process::id();
        let (net, first) = (pid % 256, k * 4);
        let host = NetHost {
            ns: format!("blk-{pid}-{k}"),
            root_if: format!("b{pid}k{k}r"),
            ns_if: format!("b{pid}k{k}h"),
            server_ip: format!("10.214.{net}.{}", first + 1),
            host_ip: format!("10.214.{net}.{}", first + 2),
        };
        let (ns, r, h) = (host.ns.as_str(), host.root_if.as_str(), host.ns_if.as_str());
        let (server, me) = (format!("{}/30", host.server_ip), format!("{}/30", host.host_ip));
        let steps: [&[&str]; 7] = [
            &["netns", "add", ns],
            &["link", "add", r, "type", "veth", "peer", "name", h, "netns", ns],
            &["addr", "add", &server, "dev", r],
            &["link", "set", r, "up"],
            &["-n", ns, "addr", "add", &me, "dev", h],
            &["-n", ns, "link", "set", h, "up"],
            &["-n", ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            assert!(ip(step), "making test host {ns}: `ip {}` failed", step.join(" "));
        }
        Some(host)
    }

    /// `program` run inside this host (`ip netns exec`, which execs it: the child's pid is the
    /// program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Takes the host's link down: the host is cut off, its processes live on.
    pub fn cut(&self) {
        assert!(ip(&["-n", &self.ns, "link", "set", &self.ns_if, "down"]), "cutting off {}", self.ns);
    }

    /// Brings the host's link back up.
    pub fn reconnect(&self) {
        assert!(ip(&["-n", &self.ns, "link", "set", &self.ns_if, "up"]), "reconnecting {}", self.ns);
    }

    /// The pids of every process in the host.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip").args(["netns", "pids", &self.ns]).output().expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }

    /// Whether process `pid` runs inside this host.
    pub fn runs(&self, pid: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ns = std::fs::metadata(format!("/run/netns/{}", self.ns)).map(|m| m.ino());
        ns.is_ok_and(|ns| std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ns))
    }

    /// SIGKILLs every process of the host (its daemon, `run`s and commands: the machine dies, its
    /// kernel lives on and closes their connections); returns their pids.
    pub fn kill_all(&self) -> Vec<i32> {
        let pids = self.pids();
        for &p in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
        }
        pids
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        // Deleting one end of the pair deletes both; the namespace goes when its last process does.
        let _ = Command::new("ip").args(["link", "del", &self.root_if]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
