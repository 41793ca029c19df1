//! The `buildlock-client` binary: a shim over the command line in `src/lib.rs` (`buildlock_cli`),
//! which the Python package runs too.

fn main() -> std::process::ExitCode {
    buildlock_cli::main()
}
