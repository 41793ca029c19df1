//! A real PostgreSQL server of a test's own: `initdb` into a temporary directory, `pg_ctl start`
//! on a private socket directory and a free loopback port, TLS with a self-signed certificate
//! authority made here (`openssl`), stopped (immediately) when dropped. As root (CI), the
//! server runs as the `postgres` system user, since initdb refuses root.
//!
//! Shared by the crate tests of `buildlock-remote` and the end-to-end suite (`#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const USER: &str = "buildlock";
pub const PASSWORD: &str = "s3cret";

pub struct PgServer {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The newest server binaries under `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PgServer {
    /// A started server, or `None` (with a loud message) when this machine has no PostgreSQL
    /// server binaries (`.ci/run` installs them).
    pub fn start() -> Option<PgServer> {
        PgServer::start_listening(None)
    }

    /// [`PgServer::start`], also listening on address `addr` and accepting password logins from
    /// network `cidr` (a test host in a network namespace).
    pub fn start_listening(extra: Option<(&str, &str)>) -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            eprintln!(
                "\n*** SKIPPED: no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; install Debian's \
                 `postgresql` package (.ci/run does) to run the remote-lock tests ***\n"
            );
            return None;
        };
        let dir = tempfile::Builder::new().prefix("pg").tempdir().unwrap();
        let as_postgres = is_root();
        let server = PgServer { dir, bin, port: free_port(), as_postgres };
        server.make_certificates();
        std::fs::create_dir(server.sock_dir()).unwrap();
        std::fs::write(server.dir.path().join("pwfile"), format!("{PASSWORD}\n")).unwrap();
        // For scripts/sweep_test_leftovers.sh, should this process be killed before `Drop` runs.
        std::fs::write(server.dir.path().join("owner"), format!("{}\n", std::process::id())).unwrap();
        if as_postgres {
            let st = Command::new("chown").arg("-R").arg("postgres:postgres").arg(server.dir.path()).status().unwrap();
            assert!(st.success(), "chown to postgres failed");
        }
        let st = server
            .cmd("initdb")
            .args(["-D"])
            .arg(server.data())
            .args(["-U", USER, "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"])
            .arg(format!("--pwfile={}", server.dir.path().join("pwfile").display()))
            .output()
            .unwrap();
        assert!(st.status.success(), "initdb failed: {}", String::from_utf8_lossy(&st.stderr));
        let listen = match extra {
            Some((addr, cidr)) => {
                let hba = server.data().join("pg_hba.conf");
                let mut text = std::fs::read_to_string(&hba).unwrap();
                text.push_str(&format!("host all all {cidr} scram-sha-256\n"));
                std::fs::write(&hba, text).unwrap();
                format!("127.0.0.1,{addr}")
            }
            None => "127.0.0.1".to_owned(),
        };
        let conf = format!(
            "listen_addresses = '{listen}'\nport = {}\nunix_socket_directories = '{}'\nfsync = off\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nmax_connections = 60\n",
            server.port,
            server.sock_dir().display(),
            server.dir.path().join("server.crt").display(),
            server.dir.path().join("server.key").display()
        );
        let conf_path = server.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        server.pg_ctl("start");
        Some(server)
    }

    fn cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, action: &str) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "-m", "fast", action])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {action} failed: {}{}\nlog: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// Stops and starts the server: every session ends.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn sock_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The CA that signed the server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other.crt")
    }

    /// A TCP URL with the password and `sslmode=disable`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    /// A URL with `extra` query parameters (no `sslmode`).
    pub fn url_with(&self, host: &str, extra: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@{host}:{}/postgres?{extra}", self.port)
    }

    /// The Unix-socket URL (trust authentication, no password).
    pub fn socket_url(&self) -> String {
        format!("postgres:///postgres?host={}&port={}&user={USER}", self.sock_dir().display(), self.port)
    }

    /// Runs `sql` through psql on the socket; its output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-h"])
            .arg(self.sock_dir())
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", "postgres", "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn make_certificates(&self) {
        let d = self.dir.path();
        let ssl = |args: &[&str]| {
            let out =
                Command::new("openssl").current_dir(d).args(args).output().expect("openssl is needed for TLS tests");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        for ca in ["ca", "other"] {
            ssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=buildlock test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        }
        ssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        ssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "ext.cnf",
        ]);
        set_mode(&d.join("server.key"), 0o600);
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.cmd("pg_ctl").arg("-D").arg(self.data()).args(["-w", "-m", "immediate", "stop"]).output();
    }
}
