//! End-to-end tests of `buildlock-client` against real processes, signals and files, and the
//! real Python `fasteners` package. One test binary; each test owns a temporary directory.

// The tests send real signals themselves.
#![allow(clippy::disallowed_methods)]

mod bad_input;
mod daemon;
mod daemon_limits;
mod daemonize;
mod deadlock;
mod exclusion;
mod history;
mod hostile;
mod interop;
mod multiplex;
#[path = "../support/netns.rs"]
mod netns;
#[path = "../support/pg_server.rs"]
mod pg_server;
mod promises;
mod protocol;
mod recovery;
mod remote;
mod remote_hosts;
mod run;
mod service;
mod soft;
mod stale;
mod status;
mod trust;
mod util;
