//! The `buildlockd` binary: a shim over the `buildlockd` crate, built in this package so that the
//! end-to-end tests find it beside `buildlock-client` (`CARGO_BIN_EXE_buildlockd`).

fn main() -> std::process::ExitCode {
    buildlockd::main()
}
